// Attention over the InfLLM cache: local ring + sinks + top-k memory blocks, one softmax.

#include "llama-infllm-hooks.h"
#include "llama-kv-cache-infllm.h"

#include "llama-impl.h"

#include <cmath>

//
// llm_graph_input_attn_infllm
//

class llm_graph_input_attn_infllm : public llm_graph_input_attn_kv {
public:
    llm_graph_input_attn_infllm(const llama_hparams & hparams, const llama_cparams & cparams,
                                const llama_kv_cache_infllm_context * mctx) :
        llm_graph_input_attn_kv(hparams, cparams, nullptr), mctx_infllm(mctx) {}

    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;

    ggml_tensor * ring_idx    = nullptr; // I32 [n_tokens]                ring cell of each token
    ggml_tensor * vt_idx      = nullptr; // I32 [n_tokens*n_embd_v]       element index into the transposed ring
    ggml_tensor * pos_idx     = nullptr; // I32 [n_tokens]                position (block store cell)
    ggml_tensor * pos_neg     = nullptr; // I32 [n_tokens]                -position (un-rotation)
    ggml_tensor * q_delta     = nullptr; // I32 [n_tokens]                n_local - position (memory queries)
    ggml_tensor * ring_mask   = nullptr; // F32 [n_ring, n_tokens] (F16 for flash attention)
    ggml_tensor * init_mask   = nullptr; // F32 [n_init, 1]
    ggml_tensor * blk_bias    = nullptr; // F32 [1, n_blocks]             0 for memory blocks, -inf otherwise
    ggml_tensor * repr_blk    = nullptr; // I32 [n_repr]                  blocks touched by the ubatch (+ scratch)
    ggml_tensor * repr_assign = nullptr; // F32 [n_tokens, n_repr]        token -> block one-hot

    uint32_t n_repr = 0;
    uint32_t n_ring = 0;       // ring cells attended
    bool     memory = false;   // sinks and blocks can be memory (the window start is past 0)
    bool     flash  = false;   // window only: one flash attention call over the ring

    const llama_kv_cache_infllm_context * mctx_infllm;
};

static const float NEG_INF = -INFINITY;

void llm_graph_input_attn_infllm::set_input(const llama_ubatch * ubatch) {
    const llama_kv_cache_infllm * c = mctx_infllm->get_cache();
    const auto & p = c->params;
    const uint32_t n_q    = ubatch->n_tokens;
    const uint32_t n_ring = c->n_ring;          // ring size (cell = pos % n_ring)
    const uint32_t n_used = this->n_ring;       // cells attended
    const llama_pos p0    = ubatch->pos[0];
    const llama_pos p_end = p0 + (llama_pos) n_q;   // exclusive
    const llama_pos ls    = c->window_start(p0);
    const uint32_t n_ev   = c->n_evicted(ls);
    const int64_t n_embd_v = vt_idx->ne[0] / n_q;

    auto * ri = (int32_t *) ring_idx->data;
    auto * vi = (int32_t *) vt_idx->data;
    auto * pi = (int32_t *) pos_idx->data;
    auto * pn = (int32_t *) pos_neg->data;
    for (uint32_t i = 0; i < n_q; ++i) {
        const llama_pos pos = ubatch->pos[i];
        ri[i] = pos % n_ring;
        pi[i] = pos;
        pn[i] = -pos;
        for (int64_t j = 0; j < n_embd_v; ++j) {
            vi[i*n_embd_v + j] = (int32_t) (j*n_ring + ri[i]);
        }
    }
    if (q_delta) {
        auto * qd = (int32_t *) q_delta->data;
        for (uint32_t i = 0; i < n_q; ++i) {
            qd[i] = (int32_t) p.n_local - ubatch->pos[i];
        }
    }

    // ring cell c holds the latest position < p_end congruent to c
    const bool f16 = ring_mask->type == GGML_TYPE_F16;
    const ggml_fp16_t h_zero = ggml_fp32_to_fp16(0.0f);
    const ggml_fp16_t h_ninf = ggml_fp32_to_fp16(NEG_INF);
    for (uint32_t cell = 0; cell < n_used; ++cell) {
        const llama_pos last = p_end - 1;
        llama_pos back = (last - (llama_pos) cell) % (llama_pos) n_ring;
        if (back < 0) {
            back += (llama_pos) n_ring;
        }
        const llama_pos pos_c = last - back;
        for (uint32_t i = 0; i < n_q; ++i) {
            const bool ok = pos_c >= ls && pos_c >= 0 && pos_c <= ubatch->pos[i];
            if (f16) {
                ((ggml_fp16_t *) ring_mask->data)[i*n_used + cell] = ok ? h_zero : h_ninf;
            } else {
                ((float *) ring_mask->data)[i*n_used + cell] = ok ? 0.0f : NEG_INF;
            }
        }
    }

    if (init_mask) {
        const bool init_is_memory = ls > 0 && ls >= (llama_pos) p.n_init;
        std::fill((float *) init_mask->data, (float *) init_mask->data + p.n_init, init_is_memory ? 0.0f : NEG_INF);
    }
    if (blk_bias) {
        auto * bb = (float *) blk_bias->data;
        for (uint32_t b = 0; b < c->n_blocks; ++b) {
            bb[b] = b < n_ev ? 0.0f : NEG_INF;
        }
    }
    if (repr_blk) {
        auto * rb = (int32_t *) repr_blk->data;
        auto * ra = (float *) repr_assign->data;
        std::fill(rb, rb + n_repr, (int32_t) c->n_blocks);   // scratch row
        std::fill(ra, ra + (size_t) n_q*n_repr, 0.0f);
        uint32_t e = 0;
        int32_t last_blk = -1;
        for (uint32_t i = 0; i < n_q; ++i) {
            const llama_pos pos = ubatch->pos[i];
            if (pos < (llama_pos) p.n_init) {
                continue;
            }
            const int32_t b = (pos - (llama_pos) p.n_init)/(llama_pos) p.block_size;
            if (b != last_blk) {
                GGML_ASSERT(e < n_repr);
                rb[e++] = b;
                last_blk = b;
            }
            ra[(e - 1)*n_q + i] = 1.0f;
        }
    }
}

// the graph shape of a ubatch: ring cells attended and whether memory is attended
static void infllm_shape(const llama_kv_cache_infllm_context * mctx, const llama_ubatch & ubatch,
                         uint32_t & n_ring, bool & memory) {
    const llama_kv_cache_infllm * c = mctx->get_cache();
    if (mctx->is_reserve() || ubatch.pos == nullptr) {
        n_ring = c->n_ring;
        memory = true;
        return;
    }
    n_ring = c->n_ring_used(ubatch.pos[0] + (llama_pos) ubatch.n_tokens);
    memory = c->window_start(ubatch.pos[0]) > 0;
}

bool llm_graph_input_attn_infllm::can_reuse(const llm_graph_params & params) {
    const auto * m = dynamic_cast<const llama_kv_cache_infllm_context *>(params.mctx);
    if (m == nullptr || m->get_cache() != mctx_infllm->get_cache() || m->is_reserve()) {
        return false;
    }
    uint32_t n_used = 0;
    bool mem = false;
    infllm_shape(m, params.ubatch, n_used, mem);
    mctx_infllm = m;
    return ring_idx->ne[0] == params.ubatch.n_tokens && n_used == n_ring && mem == memory;
}

//
// hooks
//

llm_graph_input_attn_kv * llama_infllm_build_attn_inp(const llm_graph_context & g) {
    const auto * mctx = dynamic_cast<const llama_kv_cache_infllm_context *>(g.mctx);
    if (mctx == nullptr) {
        return nullptr;
    }
    const llama_kv_cache_infllm * c = mctx->get_cache();
    const auto & p = c->params;
    ggml_context * ctx0 = g.ctx0;
    const int64_t n_q = g.n_tokens;
    const int64_t n_embd_v = g.hparams.n_embd_v_gqa(0);

    auto inp = std::make_unique<llm_graph_input_attn_infllm>(g.hparams, g.cparams, mctx);
    infllm_shape(mctx, g.ubatch, inp->n_ring, inp->memory);

    auto input = [&](ggml_type type, int64_t ne0, int64_t ne1, const char * name) {
        ggml_tensor * t = ggml_new_tensor_2d(ctx0, type, ne0, ne1);
        ggml_set_input(t);
        ggml_set_name(t, name);
        return t;
    };
    inp->ring_idx  = input(GGML_TYPE_I32, n_q, 1, "infllm_ring_idx");
    inp->vt_idx    = input(GGML_TYPE_I32, n_q*n_embd_v, 1, "infllm_vt_idx");
    inp->pos_idx   = input(GGML_TYPE_I32, n_q, 1, "infllm_pos_idx");
    inp->pos_neg   = input(GGML_TYPE_I32, n_q, 1, "infllm_pos_neg");
    inp->flash     = !inp->memory && g.cparams.flash_attn;
    inp->ring_mask = input(inp->flash ? GGML_TYPE_F16 : GGML_TYPE_F32, inp->n_ring, n_q, "infllm_ring_mask");
    if (!p.absolute && inp->memory) {
        inp->q_delta = input(GGML_TYPE_I32, n_q, 1, "infllm_q_delta");
    }
    if (p.n_init > 0 && inp->memory) {
        inp->init_mask = input(GGML_TYPE_F32, p.n_init, 1, "infllm_init_mask");
    }
    if (c->n_sel > 0 && inp->memory) {
        inp->blk_bias = input(GGML_TYPE_F32, 1, c->n_blocks, "infllm_blk_bias");
    }
    if (c->n_blocks > 0) {
        inp->n_repr      = (uint32_t) (n_q/p.block_size + 2);
        inp->repr_blk    = input(GGML_TYPE_I32, inp->n_repr, 1, "infllm_repr_blk");
        inp->repr_assign = input(GGML_TYPE_F32, n_q, inp->n_repr, "infllm_repr_assign");
    }

    return (llm_graph_input_attn_kv *) g.res->add_input(std::move(inp));
}

llm_graph_input_attn_infllm * llama_infllm_as_input(llm_graph_input_attn_kv * inp) {
    return dynamic_cast<llm_graph_input_attn_infllm *>(inp);
}

// keys of a ubatch, rotated back to position 0 (the "raw" keys of the memory)
static ggml_tensor * infllm_unrotate(const llm_graph_context & g, ggml_tensor * k, ggml_tensor * pos_neg) {
    return ggml_rope_ext(g.ctx0, k, pos_neg, nullptr, g.n_rot, g.rope_type, g.n_ctx_orig, g.freq_base, g.freq_scale,
                         g.ext_factor, g.attn_factor, g.beta_fast, g.beta_slow);
}

// the attention output projection, as the stock build_attn applies it
static ggml_tensor * infllm_output(const llm_graph_context & g, ggml_tensor * cur,
                                   ggml_tensor * wo, ggml_tensor * wo_b, ggml_tensor * wo_s, int il) {
    g.cb(cur, "kqv_out", il);
    if (wo) {
        cur = g.build_lora_mm(wo, cur, wo_s);
    }
    if (wo_b) {
        cur = ggml_add(g.ctx0, cur, wo_b);
    }
    return cur;
}

ggml_tensor * llama_infllm_build_attn(
        const llm_graph_context & g,
        llm_graph_input_attn_infllm * inp,
        ggml_tensor * wo,
        ggml_tensor * wo_b,
        ggml_tensor * wo_s,
        ggml_tensor * q_cur,
        ggml_tensor * k_cur,
        ggml_tensor * v_cur,
        float         kq_scale,
        int           il) {
    ggml_context * ctx0 = g.ctx0;
    ggml_cgraph  * gf   = g.gf;
    const llama_kv_cache_infllm * c = inp->mctx_infllm->get_cache();
    const auto & p = c->params;
    const auto & L = c->get_layer(il);

    const int64_t d_k    = k_cur->ne[0];
    const int64_t d_v    = v_cur->ne[0];
    const int64_t n_kv_h = k_cur->ne[1];
    const int64_t n_q    = q_cur->ne[2];
    const int64_t n_head = q_cur->ne[1];
    const int64_t row_k  = d_k*n_kv_h;
    const int64_t row_v  = d_v*n_kv_h;
    const int64_t n_ring = inp->n_ring;   // ring cells attended
    const int64_t bs     = p.block_size;

    if (!ggml_is_contiguous(v_cur)) {
        v_cur = ggml_cont(ctx0, v_cur);
    }
    ggml_build_forward_expand(gf, q_cur);
    ggml_build_forward_expand(gf, v_cur);
    ggml_build_forward_expand(gf, k_cur);

    //
    // writes: ring (rotated K, transposed V), block store, representative key sums
    //

    ggml_tensor * k_raw = infllm_unrotate(g, k_cur, inp->pos_neg);   // [d_k, n_kv_h, n_q] f32
    ggml_tensor * k_rows = ggml_reshape_2d(ctx0, k_cur, row_k, n_q);
    ggml_tensor * v_rows = ggml_reshape_2d(ctx0, v_cur, row_v, n_q);

    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, L.k_ring, k_rows, inp->ring_idx));
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, L.v_ring, v_rows, inp->ring_idx));
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0,
            ggml_reshape_2d(ctx0, L.v_ring_t, 1, ggml_nelements(L.v_ring_t)),
            ggml_reshape_2d(ctx0, v_cur, 1, row_v*n_q), inp->vt_idx));
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, L.k_blk,
            p.absolute ? k_rows : ggml_reshape_2d(ctx0, k_raw, row_k, n_q), inp->pos_idx));
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, L.v_blk, v_rows, inp->pos_idx));

    if (inp->repr_blk) {
        ggml_tensor * raw_t = ggml_cont(ctx0, ggml_transpose(ctx0, ggml_reshape_2d(ctx0, k_raw, row_k, n_q)));  // [n_q, row_k]
        ggml_tensor * sums  = ggml_mul_mat(ctx0, raw_t, inp->repr_assign);                                     // [row_k, n_repr]
        ggml_tensor * upd   = ggml_add(ctx0, ggml_get_rows(ctx0, L.repr, inp->repr_blk), sums);
        ggml_build_forward_expand(gf, ggml_set_rows(ctx0, L.repr, upd, inp->repr_blk));
    }

    //
    // scores: local ring with the true-position queries
    //

    ggml_tensor * q = ggml_permute(ctx0, q_cur, 0, 2, 1, 3);                                            // [d_k, n_q, n_head]
    ggml_tensor * k_ring = ggml_permute(ctx0,
            ggml_view_3d(ctx0, L.k_ring, d_k, n_kv_h, n_ring, ggml_row_size(L.k_ring->type, d_k), L.k_ring->nb[1], 0),
            0, 2, 1, 3);
    if (inp->flash) {
        // no memory yet: plain causal attention over the window, as the stock cache does it
        ggml_tensor * v = ggml_permute(ctx0,
                ggml_view_3d(ctx0, L.v_ring, d_v, n_kv_h, n_ring, ggml_row_size(L.v_ring->type, d_v), L.v_ring->nb[1], 0),
                0, 2, 1, 3);
        ggml_tensor * fa = ggml_flash_attn_ext(ctx0, q, k_ring, v, inp->ring_mask, kq_scale, 0.0f, 0.0f);
        ggml_flash_attn_ext_set_prec(fa, GGML_PREC_F32);
        return infllm_output(g, ggml_reshape_2d(ctx0, fa, d_v*n_head, n_q), wo, wo_b, wo_s, il);
    }

    ggml_tensor * kq = ggml_mul_mat(ctx0, k_ring, q);                                                   // [n_ring, n_q, n_head]
    ggml_tensor * mask = inp->ring_mask;

    //
    // memory: sinks + top-k blocks
    //

    int64_t n_mem = 0;
    ggml_tensor * k_mem = nullptr;
    ggml_tensor * v_mem = nullptr;
    ggml_tensor * mem_mask = nullptr;
    auto append = [&](ggml_tensor * a, ggml_tensor * b) { return a == nullptr ? b : ggml_concat(ctx0, a, b, 1); };

    if (p.n_init > 0 && inp->memory) {
        // f32 like the rows gathered below
        k_mem    = ggml_cast(ctx0, ggml_view_2d(ctx0, L.k_blk, row_k, p.n_init, L.k_blk->nb[1], 0), GGML_TYPE_F32);
        v_mem    = ggml_cast(ctx0, ggml_view_2d(ctx0, L.v_blk, row_v, p.n_init, L.v_blk->nb[1], 0), GGML_TYPE_F32);
        mem_mask = inp->init_mask;
        n_mem    = p.n_init;
    }

    // queries for the memory: at distance n_local from every memory key (InfLLM), or as is
    ggml_tensor * q_mem_cur = p.absolute || !inp->memory ? q_cur :
        ggml_rope_ext(ctx0, q_cur, inp->q_delta, nullptr, g.n_rot, g.rope_type, g.n_ctx_orig, g.freq_base,
                      g.freq_scale, g.ext_factor, g.attn_factor, g.beta_fast, g.beta_slow);

    if (c->n_sel > 0 && inp->memory) {
        const int64_t n_gqa = n_head/n_kv_h;
        // chunk query summed over tokens and over the heads sharing a KV head: [row_k]
        ggml_tensor * qs = ggml_cont(ctx0, ggml_permute(ctx0, q_mem_cur, 1, 2, 0, 3));                 // [n_q, d_k, n_head]
        qs = ggml_sum_rows(ctx0, qs);                                                                   // [1, d_k, n_head]
        qs = ggml_reshape_3d(ctx0, qs, d_k, n_gqa, n_kv_h);
        qs = ggml_sum_rows(ctx0, ggml_cont(ctx0, ggml_permute(ctx0, qs, 1, 0, 2, 3)));                 // [1, d_k, n_kv_h]
        qs = ggml_reshape_2d(ctx0, qs, row_k, 1);

        ggml_tensor * repr   = ggml_view_2d(ctx0, L.repr, row_k, c->n_blocks, L.repr->nb[1], 0);
        ggml_tensor * scores = ggml_mul_mat(ctx0, repr, qs);                                            // [n_blocks, 1]
        scores = ggml_add(ctx0, scores, ggml_reshape_2d(ctx0, inp->blk_bias, c->n_blocks, 1));
        ggml_tensor * sel = ggml_top_k(ctx0, scores, c->n_sel);                                        // I32 [n_sel, 1]
        sel = ggml_reshape_1d(ctx0, sel, c->n_sel);

        const size_t off_k = p.n_init*L.k_blk->nb[1];
        const size_t off_v = p.n_init*L.v_blk->nb[1];
        ggml_tensor * kb = ggml_view_2d(ctx0, L.k_blk, row_k*bs, c->n_blocks, L.k_blk->nb[1]*bs, off_k);
        ggml_tensor * vb = ggml_view_2d(ctx0, L.v_blk, row_v*bs, c->n_blocks, L.v_blk->nb[1]*bs, off_v);
        k_mem = append(k_mem, ggml_reshape_2d(ctx0, ggml_get_rows(ctx0, kb, sel), row_k, bs*c->n_sel));
        v_mem = append(v_mem, ggml_reshape_2d(ctx0, ggml_get_rows(ctx0, vb, sel), row_v, bs*c->n_sel));

        // a picked block that is not memory yet (fewer memory blocks than n_sel) is masked
        ggml_tensor * bias = ggml_get_rows(ctx0, inp->blk_bias, sel);                                   // [1, n_sel]
        bias = ggml_repeat(ctx0, bias, ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, bs, c->n_sel));
        bias = ggml_reshape_2d(ctx0, bias, bs*c->n_sel, 1);
        mem_mask = mem_mask == nullptr ? bias : ggml_concat(ctx0, mem_mask, bias, 0);
        n_mem += bs*c->n_sel;
    }

    if (n_mem > 0) {
        ggml_tensor * qm = ggml_permute(ctx0, q_mem_cur, 0, 2, 1, 3);
        ggml_tensor * km = ggml_permute(ctx0, ggml_reshape_3d(ctx0, k_mem, d_k, n_kv_h, n_mem), 0, 2, 1, 3);
        ggml_tensor * kq_mem = ggml_mul_mat(ctx0, km, qm);                                              // [n_mem, n_q, n_head]
        kq   = ggml_concat(ctx0, kq_mem, kq, 0);
        mask = ggml_concat(ctx0, ggml_repeat(ctx0, mem_mask, ggml_new_tensor_2d(ctx0, GGML_TYPE_F32, n_mem, n_q)), mask, 0);
    }

    // one softmax over memory + local
    kq = ggml_soft_max_ext(ctx0, kq, mask, kq_scale, 0.0f);

    ggml_tensor * p_loc = ggml_view_3d(ctx0, kq, n_ring, n_q, n_head, kq->nb[1], kq->nb[2], n_mem*ggml_element_size(kq));
    ggml_tensor * v_ring = ggml_view_3d(ctx0, L.v_ring_t, n_ring, d_v, n_kv_h, L.v_ring_t->nb[1], L.v_ring_t->nb[1]*d_v, 0);
    ggml_tensor * kqv = ggml_mul_mat(ctx0, v_ring, p_loc);                                              // [d_v, n_q, n_head]

    if (n_mem > 0) {
        ggml_tensor * p_mem = ggml_view_3d(ctx0, kq, n_mem, n_q, n_head, kq->nb[1], kq->nb[2], 0);
        ggml_tensor * vm = ggml_cont(ctx0, ggml_transpose(ctx0, v_mem));                                // [n_mem, row_v]
        vm = ggml_reshape_3d(ctx0, vm, n_mem, d_v, n_kv_h);
        kqv = ggml_add(ctx0, kqv, ggml_mul_mat(ctx0, vm, p_mem));
    }

    return infllm_output(g, ggml_cont_2d(ctx0, ggml_permute(ctx0, kqv, 0, 2, 1, 3), d_v*n_head, n_q), wo, wo_b, wo_s, il);
}
