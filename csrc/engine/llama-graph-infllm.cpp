// Attention over the InfLLM cache: local ring + sinks + top-k memory blocks, one softmax.

#include "llama-infllm-attn-cpu.h"
#include "llama-infllm-hooks.h"
#include "llama-kv-cache-infllm.h"

#include "llama-impl.h"

#include <algorithm>
#include <cmath>

//
// llm_graph_input_attn_infllm
//

class llm_graph_input_attn_infllm : public llm_graph_input_attn_kv {
public:
    llm_graph_input_attn_infllm(const llama_hparams & hparams, const llama_cparams & cparams,
                                const llama_kv_cache_infllm_context * mctx) :
        llm_graph_input_attn_kv(hparams, cparams, nullptr), mctx_infllm(mctx), cache(mctx->get_cache()) {}

    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;

    ggml_tensor * ring_idx    = nullptr; // I32 [n_tokens]            working-set row of each token (ring part)
    ggml_tensor * sel_pos     = nullptr; // I32 [1]                   -(memory position): the selection query shift
    ggml_tensor * kq_mask     = nullptr; // F16 [n_mem + n_ring, n_tokens]
    ggml_tensor * blk_bias    = nullptr; // F32 [1, n_blocks]         0 for memory blocks, -inf otherwise
    uint32_t n_ring = 0;       // ring cells attended
    uint32_t n_sel  = 0;       // blocks selected (0 while there are none, or topk is 0)
    bool     memory = false;   // the window start is past 0: sinks and blocks are memory
    bool     evict  = false;   // blocks (or the sinks) leave the window in this ubatch

    // the memory context of the ubatch being computed: llama_decode frees it when it returns,
    // so can_reuse must not look at the previous one (it compares caches through `cache`)
    const llama_kv_cache_infllm_context * mctx_infllm;
    const llama_kv_cache_infllm * cache;   // lives as long as the llama_context
};

// memory rows attended: the sinks and the selected blocks
static uint32_t infllm_n_mem(const llama_infllm_params & p, bool memory, uint32_t n_sel) {
    return memory ? p.n_init + n_sel*p.block_size : 0;
}

// the graph shape of a ubatch: ring cells attended, whether there is memory, blocks selected
struct infllm_shape {
    uint32_t n_ring = 0;
    uint32_t n_sel  = 0;
    bool     memory = false;
    bool     evict  = false;

    infllm_shape(const llama_kv_cache_infllm_context * mctx, const llama_ubatch & ubatch) {
        const llama_kv_cache_infllm * c = mctx->get_cache();
        if (mctx->is_reserve() || ubatch.pos == nullptr) {
            // the largest graph
            n_ring = c->n_ring;
            n_sel  = c->n_sel;
            memory = true;
            evict  = true;
            return;
        }
        const llama_pos ls = c->window_start(ubatch.pos[0]);
        n_ring = c->n_ring_used(ubatch.pos[0] + (llama_pos) ubatch.n_tokens);
        memory = ls > 0;
        n_sel  = memory ? c->n_selected(ls) : 0;
        evict  = memory && c->needs_eviction(ls);
    }

    uint32_t n_mem(const llama_infllm_params & p) const { return infllm_n_mem(p, memory, n_sel); }
};

static const float NEG_INF = -INFINITY;

void llm_graph_input_attn_infllm::set_input(const llama_ubatch * ubatch) {
    const llama_kv_cache_infllm * c = mctx_infllm->get_cache();
    const auto & p = c->params;
    const uint32_t n_q    = ubatch->n_tokens;
    const uint32_t n_ring = c->n_ring;          // ring size (cell = pos % n_ring)
    const uint32_t n_used = this->n_ring;       // cells attended
    const uint32_t n_mem  = infllm_n_mem(p, this->memory, this->n_sel);
    const uint32_t n_att  = n_mem + n_used;
    const llama_pos p0    = ubatch->pos[0];
    const llama_pos p_end = p0 + (llama_pos) n_q;   // exclusive
    const llama_pos ls    = c->window_start(p0);
    const uint32_t n_ev   = c->n_evicted(ls);

    auto * ri = (int32_t *) ring_idx->data;
    for (uint32_t i = 0; i < n_q; ++i) {
        ri[i] = (int32_t) (c->n_mem_max + ubatch->pos[i] % n_ring);   // the ring follows the slots and the sinks
    }
    if (sel_pos) {
        *(int32_t *) sel_pos->data = -llama_kv_cache_infllm::memory_position(ls);
    }

    // memory rows: all attended (sinks and blocks are memory whenever they are in the graph);
    // ring cell c holds the latest position < p_end congruent to c
    auto * m = (ggml_fp16_t *) kq_mask->data;
    const ggml_fp16_t h_zero = ggml_fp32_to_fp16(0.0f);
    const ggml_fp16_t h_ninf = ggml_fp32_to_fp16(NEG_INF);
    for (uint32_t i = 0; i < n_q; ++i) {
        std::fill(m + (size_t) i*n_att, m + (size_t) i*n_att + n_mem, h_zero);
    }
    for (uint32_t cell = 0; cell < n_used; ++cell) {
        const llama_pos last = p_end - 1;
        llama_pos back = (last - (llama_pos) cell) % (llama_pos) n_ring;
        if (back < 0) {
            back += (llama_pos) n_ring;
        }
        const llama_pos pos_c = last - back;
        for (uint32_t i = 0; i < n_q; ++i) {
            const bool ok = pos_c >= ls && pos_c >= 0 && pos_c <= ubatch->pos[i];
            m[(size_t) i*n_att + n_mem + cell] = ok ? h_zero : h_ninf;
        }
    }

    if (blk_bias) {
        auto * bb = (float *) blk_bias->data;
        for (uint32_t b = 0; b < c->n_blocks; ++b) {
            bb[b] = b < n_ev ? 0.0f : NEG_INF;
        }
    }
}

bool llm_graph_input_attn_infllm::can_reuse(const llm_graph_params & params) {
    const auto * m = dynamic_cast<const llama_kv_cache_infllm_context *>(params.mctx);
    if (m == nullptr || m->get_cache() != cache || m->is_reserve()) {
        return false;
    }
    const infllm_shape now(m, params.ubatch);
    mctx_infllm = m;
    return ring_idx->ne[0] == params.ubatch.n_tokens && now.n_ring == n_ring && now.n_sel == n_sel &&
           now.memory == memory && now.evict == evict;
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

    auto inp = std::make_unique<llm_graph_input_attn_infllm>(g.hparams, g.cparams, mctx);
    const infllm_shape shape(mctx, g.ubatch);
    inp->n_ring = shape.n_ring;
    inp->n_sel  = shape.n_sel;
    inp->memory = shape.memory;
    inp->evict  = shape.evict;

    auto input = [&](ggml_type type, int64_t ne0, int64_t ne1, const char * name) {
        ggml_tensor * t = ggml_new_tensor_2d(ctx0, type, ne0, ne1);
        ggml_set_input(t);
        ggml_set_name(t, name);
        return t;
    };
    inp->ring_idx = input(GGML_TYPE_I32, n_q, 1, "infllm_ring_idx");
    inp->kq_mask  = input(GGML_TYPE_F16, shape.n_mem(p) + shape.n_ring, n_q, "infllm_kq_mask");
    if (inp->n_sel > 0) {
        inp->sel_pos  = input(GGML_TYPE_I32, 1, 1, "infllm_sel_pos");
        inp->blk_bias = input(GGML_TYPE_F32, 1, c->n_blocks, "infllm_blk_bias");
    }

    return (llm_graph_input_attn_kv *) g.res->add_input(std::move(inp));
}

llm_graph_input_attn_infllm * llama_infllm_as_input(llm_graph_input_attn_kv * inp) {
    return dynamic_cast<llm_graph_input_attn_infllm *>(inp);
}

// rotate rows of head vectors by `pos` (RoPE); x is [d, n_head, n], pos I32 [n]
static ggml_tensor * infllm_rope(const llm_graph_context & g, ggml_tensor * x, ggml_tensor * pos) {
    return ggml_rope_ext(g.ctx0, x, pos, nullptr, g.n_rot, g.rope_type, g.n_ctx_orig, g.freq_base, g.freq_scale,
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
    const int64_t bs     = p.block_size;
    const int64_t n_sel  = inp->n_sel;
    const int64_t n_mem  = infllm_n_mem(p, inp->memory, inp->n_sel);
    const int64_t m0     = c->n_mem_max - n_mem;       // first working-set row attended: the last n_sel slots
    const int64_t n_att  = n_mem + inp->n_ring;        // rows attended: slots, sinks, ring

    if (!ggml_is_contiguous(v_cur)) {
        v_cur = ggml_cont(ctx0, v_cur);
    }
    ggml_build_forward_expand(gf, q_cur);
    ggml_build_forward_expand(gf, v_cur);
    ggml_build_forward_expand(gf, k_cur);

    //
    // memory: top-k blocks by Σ q̄·repr. The scheduler stops at the evict node (when blocks
    // left the window) and the cache moves them from the ring to the host store and writes
    // their representative keys; then at the sync node, after the selection, the cache
    // places the picked blocks into the working-set slots (only those not already there).
    // Both come before this ubatch's ring writes, so the ring still holds every position
    // the eviction reads. In "infllm" mode memory keys sit at one position just
    // before the window: queries see them at distance p - ls + 1 (n_local + 1 .. n_local +
    // block_size for a decode step).
    //

    auto hand_over = [&](ggml_tensor * t, const char * prefix) {
        ggml_format_name(t, "%s%d", prefix, il);
        ggml_set_output(t);
        ggml_build_forward_expand(gf, t);
    };
    // a tiny node to hang a hand-over on
    auto marker = [&]() { return ggml_cont(ctx0, ggml_view_1d(ctx0, inp->ring_idx, 1, 0)); };

    if (inp->evict) {
        // the selection below reads the representative keys of the blocks evicted here
        hand_over(marker(), llama_kv_cache_infllm::EVICT_NODE);
    }

    ggml_tensor * sync = nullptr;
    if (n_sel > 0) {
        const int64_t n_gqa = n_head/n_kv_h;
        // the chunk's query summed over its tokens, rotated as seen from the memory position
        // (rotation is linear), summed over the heads sharing a KV head: [row_k]
        ggml_tensor * qs = ggml_cont(ctx0, ggml_permute(ctx0, q_cur, 1, 2, 0, 3));    // [n_q, d_k, n_head]
        qs = ggml_reshape_3d(ctx0, ggml_sum_rows(ctx0, qs), d_k, n_head, 1);
        qs = infllm_rope(g, qs, inp->sel_pos);
        qs = ggml_reshape_3d(ctx0, qs, d_k, n_gqa, n_kv_h);
        qs = ggml_sum_rows(ctx0, ggml_cont(ctx0, ggml_permute(ctx0, qs, 1, 0, 2, 3)));  // [1, d_k, n_kv_h]
        qs = ggml_reshape_2d(ctx0, qs, row_k, 1);

        ggml_tensor * scores = ggml_add(ctx0, ggml_mul_mat(ctx0, L.repr, qs),
                                        ggml_reshape_2d(ctx0, inp->blk_bias, c->n_blocks, 1));  // [n_blocks, 1]
        // n_sel <= memory blocks, so every pick has a finite score
        sync = ggml_top_k(ctx0, scores, n_sel);
    } else if (inp->memory) {
        sync = marker();   // sinks only
    }
    if (sync != nullptr) {
        hand_over(sync, llama_kv_cache_infllm::SYNC_NODE);
    }

    //
    // this ubatch's keys and values into the ring
    //

    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, L.k_work, ggml_reshape_2d(ctx0, k_cur, row_k, n_q), inp->ring_idx));
    ggml_build_forward_expand(gf, ggml_set_rows(ctx0, L.v_work, ggml_reshape_2d(ctx0, v_cur, row_v, n_q), inp->ring_idx));

    //
    // one flash attention over memory + ring (one softmax, nothing counted twice)
    //

    ggml_tensor * k = ggml_view_3d(ctx0, L.k_work, d_k, n_kv_h, n_att,
            ggml_row_size(L.k_work->type, d_k), L.k_work->nb[1], m0*L.k_work->nb[1]);   // [d_k, n_kv_h, n_att]
    ggml_tensor * v = ggml_view_3d(ctx0, L.v_work, d_v, n_kv_h, n_att,
            ggml_row_size(L.v_work->type, d_v), L.v_work->nb[1], m0*L.v_work->nb[1]);
    if (n_q == 1 && c->one_query_kernel && ggml_is_contiguous(q_cur) && q_cur->type == GGML_TYPE_F32) {
        // decode step on the CPU backend: our single-query kernel (llama-infllm-attn-cpu.h)
        const int n_chunks = (int) std::clamp<int64_t>(n_att/256, 1, 32);
        ggml_tensor * out = llama_infllm_attn_one_query_cpu(ctx0, q_cur, k, v, inp->kq_mask, kq_scale, n_chunks);
        return infllm_output(g, out, wo, wo_b, wo_s, il);
    }
    ggml_tensor * q = ggml_permute(ctx0, q_cur, 0, 2, 1, 3);                                  // [d_k, n_q, n_head]
    ggml_tensor * fa = ggml_flash_attn_ext(ctx0, q, ggml_permute(ctx0, k, 0, 2, 1, 3), ggml_permute(ctx0, v, 0, 2, 1, 3),
                                           inp->kq_mask, kq_scale, 0.0f, 0.0f);
    ggml_prec_set_acc(fa, GGML_PREC_F32);
    return infllm_output(g, ggml_reshape_2d(ctx0, fa, d_v*n_head, n_q), wo, wo_b, wo_s, il);
}
