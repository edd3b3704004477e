// Attention over the InfLLM cache: local ring + sinks + top-k memory blocks, one softmax.

#include "llama-infllm-attn-cpu.h"
#include "llama-infllm-hooks.h"
#include "llama-kv-cache-infllm.h"
#include "llama-kv-cache-infllm-iswa.h"

#include "llama-arch.h"
#include "llama-impl.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <numeric>
#include <string>

//
// llm_graph_input_attn_infllm
//

// the graph shape of a ubatch: everything that changes the nodes of its graph
struct infllm_shape_t {
    uint32_t n_ring   = 0;       // ring cells attended
    uint32_t n_sel    = 0;       // blocks selected (0 while there are none, or topk is 0)
    bool     memory   = false;   // the window start is past 0: sinks and blocks are memory
    uint32_t n_ev     = 0;       // blocks that leave the window in this ubatch
    bool     ev_sinks = false;   // the sinks leave the window in this ubatch
    bool     true_pos = false;   // memory keys at their true positions (a ubatch inside params.true_below)
    bool     packed   = false;   // memory keys packed before the window in their order (params.packed, not true_pos)

    infllm_shape_t() = default;
    infllm_shape_t(const llama_kv_cache_infllm_context * mctx, const llama_ubatch & ubatch);
    bool operator==(const infllm_shape_t & o) const;
};

class llm_graph_input_attn_infllm : public llm_graph_input_attn_kv {
public:
    llm_graph_input_attn_infllm(const llama_hparams & hparams, const llama_cparams & cparams,
                                const llama_kv_cache_infllm_context * mctx) :
        llm_graph_input_attn_kv(hparams, cparams, nullptr), mctx_infllm(mctx), cache(mctx->get_cache()) {}

    void set_input(const llama_ubatch * ubatch) override;
    bool can_reuse(const llm_graph_params & params) override;

    ggml_tensor * ring_idx  = nullptr; // I32 [n_tokens]       working-set row of each token (ring part)
    ggml_tensor * kq_mask   = nullptr; // F16 [n_att, n_tokens] rows: selected blocks, sinks, ring cells, padding
    ggml_tensor * sel_pos   = nullptr; // I32 [1]              -(memory position): rotates a query to see memory
    ggml_tensor * mem_pos   = nullptr; // I32 [max(n_sel*bs, n_init)] the memory position (key rotation)
    ggml_tensor * blk_tpos  = nullptr; // I32 [bs, n_blocks]   true positions of every block's rows (true_pos)
    ggml_tensor * blk_tneg  = nullptr; // I32 [1, n_blocks]    -(true position of every block's first row) (true_pos)
    ggml_tensor * sink_tpos = nullptr; // I32 [max(bs, n_init)] 0, 1, ..: the sinks' true positions, a row's
                                       //                      offset in its block (true_pos)
    ggml_tensor * pk_pos    = nullptr; // I32 [bs, n_sel]      packed positions of the rows of the j-th picked block (packed)
    ggml_tensor * pk_neg    = nullptr; // I32 [1, n_sel]       -(packed position of the j-th picked block's first row) (packed)
    ggml_tensor * pk_sink   = nullptr; // I32 [n_init]         packed positions of the sinks (packed)
    ggml_tensor * pk_sneg   = nullptr; // I32 [1]              -(packed position of the first sink) (packed)
    ggml_tensor * blk_bias  = nullptr; // F32 [1, n_blocks]    0 for memory blocks, -inf otherwise
    ggml_tensor * ev_cells  = nullptr; // I32 [n_ev*bs]        ring rows of the blocks leaving the window
    ggml_tensor * ev_pos    = nullptr; // I32 [n_ev*bs]        their -positions (to rotate keys back to 0)
    ggml_tensor * ev_dst    = nullptr; // I32 [n_ev*bs]        their rows in the pool (resident) or eviction buffer
    ggml_tensor * ev_blk    = nullptr; // I32 [n_ev]           their block ids (representative-key rows)
    ggml_tensor * sink_cells = nullptr; // I32 [n_init]        ring rows of the sinks, when they leave the window
    ggml_tensor * sink_pos   = nullptr; // I32 [n_init]        their -positions

    infllm_shape_t shape;

    // the memory context of the ubatch being computed: llama_decode frees it when it returns,
    // so can_reuse must not look at the previous one (it compares caches through `cache`)
    const llama_kv_cache_infllm_context * mctx_infllm;
    const llama_kv_cache_infllm * cache;   // lives as long as the llama_context
};

// memory rows attended: the sinks and the selected blocks
static uint32_t infllm_n_mem(const llama_infllm_params & p, bool memory, uint32_t n_sel) {
    return memory ? p.n_init + n_sel*p.block_size : 0;
}

// packed positions (params.packed): the n_sel picked blocks, in their order, end where the window
// starts at ls, the sinks just before them. The start of the j-th block, or with j = -1 of the
// sinks. With every block picked (and ls on a block boundary) these are the true positions.
static llama_pos infllm_packed_start(const llama_infllm_params & p, llama_pos ls, uint32_t n_sel, int64_t j) {
    if (j < 0) {
        return ls - (llama_pos) (n_sel*p.block_size + p.n_init);
    }
    return ls - (llama_pos) ((n_sel - j)*p.block_size);
}

infllm_shape_t::infllm_shape_t(const llama_kv_cache_infllm_context * mctx, const llama_ubatch & ubatch) {
    const llama_kv_cache_infllm * c = mctx->get_cache();
    if (mctx->is_reserve() || ubatch.pos == nullptr) {
        // the largest graph
        n_ring   = c->n_ring;
        n_sel    = c->n_sel;
        memory   = true;
        n_ev     = c->n_ev_max;
        ev_sinks = c->params.n_init > 0;
        true_pos = !c->params.absolute && c->params.true_below > 0;   // its inputs and the gather path
        packed   = !c->params.absolute && c->params.packed && !true_pos;
        return;
    }
    const auto & plan = c->cur;
    n_ring   = c->n_ring_used(ubatch.pos[0] + (llama_pos) ubatch.n_tokens);
    memory   = plan.ls > 0;
    n_sel    = memory ? c->n_selected(plan.ls) : 0;
    n_ev     = plan.ev_b1 - plan.ev_b0;
    ev_sinks = plan.ev_sinks;
    // every query of the ubatch is below true_below: every distance it can see at true
    // positions is one the model was trained on
    true_pos = memory && !c->params.absolute && c->params.true_below > 0 &&
               ubatch.pos[0] + (llama_pos) ubatch.n_tokens <= (llama_pos) c->params.true_below;
    packed   = memory && !c->params.absolute && c->params.packed && !true_pos;
}

bool infllm_shape_t::operator==(const infllm_shape_t & o) const {
    return n_ring == o.n_ring && n_sel == o.n_sel && memory == o.memory && n_ev == o.n_ev && ev_sinks == o.ev_sinks &&
           true_pos == o.true_pos && packed == o.packed;
}

static const float NEG_INF = -INFINITY;

void llm_graph_input_attn_infllm::set_input(const llama_ubatch * ubatch) {
    const llama_kv_cache_infllm * c = mctx_infllm->get_cache();
    const auto & p = c->params;
    const uint32_t n_q    = ubatch->n_tokens;
    const uint32_t n_ring = c->n_ring;          // ring size (cell = pos % n_ring)
    const uint32_t n_used = shape.n_ring;       // cells attended
    const uint32_t n_mem  = infllm_n_mem(p, shape.memory, shape.n_sel);
    const uint32_t n_att  = llama_kv_cache_infllm::n_attended(n_mem, n_used);   // with the masked padding
    const llama_pos p_end = ubatch->pos[0] + (llama_pos) n_q;   // exclusive
    const llama_pos ls    = c->cur.ls;
    const llama_pos r     = llama_kv_cache_infllm::memory_position(ls);

    auto * ri = (int32_t *) ring_idx->data;
    for (uint32_t i = 0; i < n_q; ++i) {
        ri[i] = (int32_t) (c->n_mem_max + ubatch->pos[i] % n_ring);   // the ring follows the memory rows
    }
    // an input that this ubatch's graph does not read is not allocated
    auto used = [](const ggml_tensor * t) { return t != nullptr && t->data != nullptr; };
    if (used(sel_pos)) {
        *(int32_t *) sel_pos->data = -r;
    }
    if (used(mem_pos)) {
        std::fill((int32_t *) mem_pos->data, (int32_t *) mem_pos->data + ggml_nelements(mem_pos), (int32_t) r);
    }
    if (used(blk_tpos)) {   // block b holds positions n_init + b*bs ...
        std::iota((int32_t *) blk_tpos->data, (int32_t *) blk_tpos->data + ggml_nelements(blk_tpos), (int32_t) p.n_init);
    }
    if (used(blk_tneg)) {
        for (int64_t b = 0; b < ggml_nelements(blk_tneg); ++b) {
            ((int32_t *) blk_tneg->data)[b] = -(int32_t) (p.n_init + b*p.block_size);
        }
    }
    if (used(sink_tpos)) {
        std::iota((int32_t *) sink_tpos->data, (int32_t *) sink_tpos->data + ggml_nelements(sink_tpos), 0);
    }
    for (uint32_t j = 0; j < shape.n_sel; ++j) {   // the gather path reads the one, the decode kernel the other
        const llama_pos s = infllm_packed_start(p, ls, shape.n_sel, j);
        if (used(pk_pos)) {
            std::iota((int32_t *) pk_pos->data + (size_t) j*p.block_size, (int32_t *) pk_pos->data + (size_t) (j + 1)*p.block_size,
                      (int32_t) s);
        }
        if (used(pk_neg)) {
            ((int32_t *) pk_neg->data)[j] = -(int32_t) s;
        }
    }
    if (used(pk_sink)) {
        std::iota((int32_t *) pk_sink->data, (int32_t *) pk_sink->data + ggml_nelements(pk_sink),
                  (int32_t) infllm_packed_start(p, ls, shape.n_sel, -1));
    }
    if (used(pk_sneg)) {
        *(int32_t *) pk_sneg->data = -(int32_t) infllm_packed_start(p, ls, shape.n_sel, -1);
    }

    // memory rows: all attended; ring cell c holds the latest position < p_end congruent to c
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
    for (uint32_t i = 0; i < n_q; ++i) {
        std::fill(m + (size_t) i*n_att + n_mem + n_used, m + (size_t) (i + 1)*n_att, h_ninf);
    }

    if (used(blk_bias)) {
        const uint32_t n_ev = c->n_evicted(ls);
        auto * bb = (float *) blk_bias->data;
        for (uint32_t b = 0; b < c->n_blocks; ++b) {
            bb[b] = b < n_ev ? 0.0f : NEG_INF;
        }
    }
    if (used(ev_cells)) {
        auto rows = [&](ggml_tensor * t) { return used(t) ? (int32_t *) t->data : nullptr; };
        c->eviction_rows(rows(ev_cells), rows(ev_pos), rows(ev_dst), rows(ev_blk));
    }
    if (used(sink_cells)) {
        for (uint32_t i = 0; i < p.n_init; ++i) {
            ((int32_t *) sink_cells->data)[i] = (int32_t) (c->n_mem_max + i % n_ring);
            if (used(sink_pos)) {   // only read to rotate the sinks' keys back to position 0
                ((int32_t *) sink_pos->data)[i] = -(int32_t) i;
            }
        }
    }
}

bool llm_graph_input_attn_infllm::can_reuse(const llm_graph_params & params) {
    const auto * m = llama_infllm_context_of(params.mctx);
    if (m == nullptr || m->get_cache() != cache || m->is_reserve()) {
        return false;
    }
    mctx_infllm = m;
    return ring_idx->ne[0] == params.ubatch.n_tokens && infllm_shape_t(m, params.ubatch) == shape;
}

//
// hooks
//

// the inputs of the InfLLM attention for the ubatch being built
static std::unique_ptr<llm_graph_input_attn_infllm> infllm_new_input(const llm_graph_context & g,
                                                                     const llama_kv_cache_infllm_context * mctx) {
    const llama_kv_cache_infllm * c = mctx->get_cache();
    const auto & p = c->params;
    ggml_context * ctx0 = g.ctx0;
    const int64_t n_q = g.n_tokens;

    auto inp = std::make_unique<llm_graph_input_attn_infllm>(g.hparams, g.cparams, mctx);
    inp->shape = infllm_shape_t(mctx, g.ubatch);
    const infllm_shape_t & shape = inp->shape;

    auto input = [&](ggml_type type, int64_t ne0, int64_t ne1, const char * name) {
        ggml_tensor * t = ggml_new_tensor_2d(ctx0, type, ne0, ne1);
        ggml_set_input(t);
        ggml_set_name(t, name);
        return t;
    };
    const int64_t n_mem = infllm_n_mem(p, shape.memory, shape.n_sel);
    inp->ring_idx = input(GGML_TYPE_I32, n_q, 1, "infllm_ring_idx");
    inp->kq_mask  = input(GGML_TYPE_F16, llama_kv_cache_infllm::n_attended(n_mem, shape.n_ring), n_q, "infllm_kq_mask");
    if (!p.absolute && (shape.n_sel > 0 || shape.memory || (shape.n_ev > 0 && p.repr_keys > 0))) {
        inp->sel_pos = input(GGML_TYPE_I32, 1, 1, "infllm_sel_pos");
        // one position for every memory row: a prefix serves the blocks and the sinks
        inp->mem_pos = input(GGML_TYPE_I32, std::max<int64_t>(1, std::max<int64_t>((int64_t) shape.n_sel*p.block_size, p.n_init)), 1,
                             "infllm_mem_pos");
    }
    if (shape.true_pos) {
        inp->blk_tpos  = input(GGML_TYPE_I32, p.block_size, c->n_blocks, "infllm_blk_tpos");
        inp->blk_tneg  = input(GGML_TYPE_I32, 1, c->n_blocks, "infllm_blk_tneg");
    }
    if (shape.true_pos || shape.packed) {
        inp->sink_tpos = input(GGML_TYPE_I32, std::max<int64_t>(p.block_size, p.n_init), 1, "infllm_sink_tpos");
    }
    if (shape.packed) {
        if (shape.n_sel > 0) {
            inp->pk_pos   = input(GGML_TYPE_I32, p.block_size, shape.n_sel, "infllm_pk_pos");
            inp->pk_neg   = input(GGML_TYPE_I32, 1, shape.n_sel, "infllm_pk_neg");
        }
        if (p.n_init > 0) {
            inp->pk_sink = input(GGML_TYPE_I32, p.n_init, 1, "infllm_pk_sink");
        }
        inp->pk_sneg = input(GGML_TYPE_I32, 1, 1, "infllm_pk_sneg");
    }
    if (shape.n_sel > 0) {
        inp->blk_bias = input(GGML_TYPE_F32, 1, c->n_blocks, "infllm_blk_bias");
    }
    if (shape.n_ev > 0) {
        const int64_t n_rows = (int64_t) shape.n_ev*p.block_size;
        inp->ev_cells = input(GGML_TYPE_I32, n_rows, 1, "infllm_ev_cells");
        inp->ev_pos   = input(GGML_TYPE_I32, n_rows, 1, "infllm_ev_pos");
        inp->ev_dst   = input(GGML_TYPE_I32, n_rows, 1, "infllm_ev_dst");
        inp->ev_blk   = input(GGML_TYPE_I32, shape.n_ev, 1, "infllm_ev_blk");
    }
    if (shape.ev_sinks) {
        inp->sink_cells = input(GGML_TYPE_I32, p.n_init, 1, "infllm_sink_cells");
        inp->sink_pos   = input(GGML_TYPE_I32, p.n_init, 1, "infllm_sink_pos");
    }
    return inp;
}

static void infllm_refuse(const llm_graph_context & g, const std::string & why);

llm_graph_input_attn_kv * llama_infllm_build_attn_inp(const llm_graph_context & g) {
    if (dynamic_cast<const llama_kv_cache_infllm_iswa_context *>(g.mctx) != nullptr) {
        infllm_refuse(g, "the model has sliding-window layers but its graph asks for a plain KV cache");
    }
    const auto * mctx = dynamic_cast<const llama_kv_cache_infllm_context *>(g.mctx);
    if (mctx == nullptr) {
        return nullptr;
    }
    return (llm_graph_input_attn_kv *) g.res->add_input(infllm_new_input(g, mctx));
}

llm_graph_input_attn_infllm * llama_infllm_as_input(llm_graph_input_attn_kv * inp) {
    return dynamic_cast<llm_graph_input_attn_infllm *>(inp);
}

//
// the sliding-window composition: llama.cpp's iSWA input (its base half holds no layer), with
// the InfLLM input of the global layers inside
//

class llm_graph_input_attn_infllm_iswa : public llm_graph_input_attn_kv_iswa {
public:
    llm_graph_input_attn_infllm_iswa(const llama_hparams & hparams, const llama_cparams & cparams,
                                     const llama_kv_cache_infllm_iswa_context * mctx,
                                     std::unique_ptr<llm_graph_input_attn_infllm> infllm) :
        llm_graph_input_attn_kv_iswa(hparams, cparams, mctx), infllm(std::move(infllm)) {}

    void set_input(const llama_ubatch * ubatch) override {
        llm_graph_input_attn_kv_iswa::set_input(ubatch);
        infllm->set_input(ubatch);
    }

    bool can_reuse(const llm_graph_params & params) override {
        if (dynamic_cast<const llama_kv_cache_infllm_iswa_context *>(params.mctx) == nullptr) {
            return false;
        }
        // both, always: each re-binds its memory context
        const bool stock = llm_graph_input_attn_kv_iswa::can_reuse(params);
        const bool ours  = infllm->can_reuse(params);
        return stock && ours;
    }

    std::unique_ptr<llm_graph_input_attn_infllm> infllm;
};

std::unique_ptr<llm_graph_input_attn_kv_iswa> llama_infllm_make_attn_inp_iswa(const llm_graph_context & g) {
    const auto * mctx = dynamic_cast<const llama_kv_cache_infllm_iswa_context *>(g.mctx);
    if (mctx == nullptr) {
        return nullptr;
    }
    return std::make_unique<llm_graph_input_attn_infllm_iswa>(g.hparams, g.cparams, mctx,
                                                              infllm_new_input(g, mctx->get_infllm()));
}

//
// how a layer positions its keys, read from the graph the model built (not from metadata)
//

// the RoPE of one layer, as the model applied it to K (and Q)
struct infllm_rope_t {
    bool          used = false;        // false: the layer's keys carry no position (no RoPE)
    int32_t       n_dims = 0, mode = 0, n_ctx_orig = 0;
    float         freq_base = 0, freq_scale = 0, ext_factor = 0, beta_fast = 0, beta_slow = 0;
    float         unit_factor = 1.0f;  // the attn_factor that makes the rotation norm-preserving
    ggml_tensor * freq_factors = nullptr;   // Llama 3's rope_freqs, Phi-3's long/short factors

    bool same_rotation(const infllm_rope_t & o) const {
        return used == o.used && n_dims == o.n_dims && mode == o.mode && n_ctx_orig == o.n_ctx_orig &&
               freq_base == o.freq_base && freq_scale == o.freq_scale && ext_factor == o.ext_factor &&
               beta_fast == o.beta_fast && beta_slow == o.beta_slow && freq_factors == o.freq_factors;
    }
};

static void infllm_refuse(const llm_graph_context & g, const std::string & why) {
    const std::string msg = std::string("InfLLM cache: ") + llm_arch_name(g.arch) + ": " + why;
    llama_infllm_note_error(msg);   // llama.cpp logs exceptions from graph building and returns null
    throw std::runtime_error(msg);
}

// t without the ops that only reshape it
static const ggml_tensor * infllm_unview(const ggml_tensor * t) {
    while (t != nullptr && (t->op == GGML_OP_RESHAPE || t->op == GGML_OP_CONT || t->op == GGML_OP_PERMUTE ||
                            t->op == GGML_OP_TRANSPOSE ||
                            (t->op == GGML_OP_VIEW && t->view_offs == 0 && ggml_nelements(t) == ggml_nelements(t->src[0])))) {
        t = t->src[0];
    }
    return t;
}

// whether a RoPE lies between t and the projection that made it
static bool infllm_rope_below(const ggml_tensor * t, int depth = 0) {
    if (t == nullptr || depth > 16) {
        return false;
    }
    if (t->op == GGML_OP_ROPE) {
        return true;
    }
    if (t->op == GGML_OP_NONE || t->op == GGML_OP_MUL_MAT || t->op == GGML_OP_MUL_MAT_ID || t->op == GGML_OP_GET_ROWS) {
        return false;
    }
    for (const ggml_tensor * s : t->src) {
        if (infllm_rope_below(s, depth + 1)) {
            return true;
        }
    }
    return false;
}

// the RoPE that produced x (Q or K of layer il), or none; anything the cache cannot
// re-position exactly is refused
static infllm_rope_t infllm_rope_of(const llm_graph_context & g, const ggml_tensor * x, const char * what, bool allow_scale) {
    const ggml_tensor * r = infllm_unview(x);
    if (allow_scale && r->op == GGML_OP_SCALE) {   // a scalar commutes with the rotation
        r = infllm_unview(r->src[0]);
    }
    infllm_rope_t out;
    if (r->op != GGML_OP_ROPE) {
        if (infllm_rope_below(r)) {
            infllm_refuse(g, std::string(what) + " is transformed after its RoPE (" + ggml_op_desc(r) +
                          "), so it cannot be re-positioned");
        }
        return out;   // no RoPE: the layer's keys are position-free
    }
    const int32_t * ip = (const int32_t *) r->op_params;
    const float   * fp = (const float *)   r->op_params;
    out.used       = true;
    out.n_dims     = ip[1];
    out.mode       = ip[2];
    out.n_ctx_orig = ip[4];
    out.freq_base  = fp[5];
    out.freq_scale = fp[6];
    out.ext_factor = fp[7];
    out.beta_fast  = fp[9];
    out.beta_slow  = fp[10];
    out.freq_factors = r->src[2];
    if (out.mode != 0 && out.mode != GGML_ROPE_TYPE_NEOX) {
        infllm_refuse(g, std::string(what) + " uses a multi-section RoPE (mode " + std::to_string(out.mode) + ")");
    }
    if (ip[15] != 0) {
        infllm_refuse(g, std::string(what) + "'s RoPE rotates dimensions at an offset");
    }
    const ggml_tensor * pos = r->src[1];
    if (pos == nullptr || pos->op != GGML_OP_NONE || std::strcmp(pos->name, "inp_pos") != 0) {
        infllm_refuse(g, std::string(what) + "'s RoPE positions are not the token positions");
    }
    // with YaRN's ramp (ext_factor != 0) ggml scales the rotated vector by
    // attn_factor*(1 + 0.1*ln(1/freq_scale)); re-rotations must keep the norm
    if (out.ext_factor != 0.0f && out.freq_scale > 0.0f) {
        out.unit_factor = 1.0f/(1.0f + 0.1f*logf(1.0f/out.freq_scale));
    }
    return out;
}

// rotate rows of head vectors by `pos` with the layer's RoPE (x is [d, n_head, n], pos I32
// [n]). Only the rotation: the magnitude scale (attn_factor) is already in the keys and
// queries the model rotated, so re-rotating them must not apply it again.
static ggml_tensor * infllm_rope(ggml_context * ctx, const infllm_rope_t & r, ggml_tensor * x, ggml_tensor * pos) {
    return ggml_rope_ext(ctx, x, pos, r.freq_factors, r.n_dims, r.mode, r.n_ctx_orig, r.freq_base, r.freq_scale,
                         r.ext_factor, r.unit_factor, r.beta_fast, r.beta_slow);
}

// a view of t that the graph computes after `deps`: an explicit edge, so that backends that
// reorder independent nodes (Vulkan, Metal, CUDA graph optimisation) keep writes to t before
// its readers, and reads of t before the writes that follow them. The view computes nothing.
static ggml_tensor * infllm_after(ggml_context * ctx, ggml_tensor * t, std::initializer_list<ggml_tensor *> deps) {
    ggml_tensor * v = ggml_view_4d(ctx, t, t->ne[0], t->ne[1], t->ne[2], t->ne[3], t->nb[1], t->nb[2], t->nb[3], 0);
    int s = 1;
    for (ggml_tensor * d : deps) {
        if (d != nullptr) {
            GGML_ASSERT(s < GGML_MAX_SRC);
            v->src[s++] = d;
        }
    }
    return v;
}

// rows [r0, r0 + n) of a 2d tensor as [d, n_head, n]
static ggml_tensor * infllm_rows_3d(ggml_context * ctx, ggml_tensor * t, int64_t d, int64_t r0, int64_t n) {
    return ggml_view_3d(ctx, t, d, t->ne[0]/d, n, ggml_row_size(t->type, d), t->nb[1], r0*t->nb[1]);
}

// the attention output projection, as the stock build_attn applies it
static ggml_tensor * infllm_output(const llm_graph_context & g, ggml_tensor * cur,
                                   ggml_tensor * wo, ggml_tensor * wo_b, ggml_tensor * wo_s, int il) {
    g.cb(cur, "kqv_out", il);
    if (wo && (g.arch == LLM_ARCH_GLM4 || g.arch == LLM_ARCH_GLM4_MOE || g.arch == LLM_ARCH_JAIS2)) {
        // as stock: these models need F32 accumulation in the output projection
        cur = g.build_lora_mm(wo, cur);
        ggml_prec_set_acc(cur, GGML_PREC_F32);
        if (wo_s) {
            cur = ggml_mul(g.ctx0, cur, wo_s);
        }
    } else if (wo) {
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
        ggml_tensor * kq_b,
        ggml_tensor * sinks,
        float         kq_scale,
        int           il) {
    ggml_context * ctx0 = g.ctx0;
    if (kq_b != nullptr || sinks != nullptr) {
        infllm_refuse(g, kq_b ? "attention with a KQ bias is not supported" : "attention sinks are not supported");
    }
    // the layer's RoPE as the model applied it; Q must be rotated the same way (the cache
    // rotates it to see memory keys)
    const infllm_rope_t rope = infllm_rope_of(g, k_cur, "K", false);
    if (!rope.same_rotation(infllm_rope_of(g, q_cur, "Q", true))) {
        infllm_refuse(g, "Q and K of layer " + std::to_string(il) + " are not rotated alike");
    }
    ggml_cgraph  * gf   = g.gf;
    const llama_kv_cache_infllm * c = inp->mctx_infllm->get_cache();
    const auto & p = c->params;
    const auto & L = c->get_layer(il);
    const infllm_shape_t & shape = inp->shape;

    const int64_t d_k    = k_cur->ne[0];
    const int64_t d_v    = v_cur->ne[0];
    const int64_t n_kv_h = k_cur->ne[1];
    const int64_t n_q    = q_cur->ne[2];
    const int64_t n_head = q_cur->ne[1];
    const int64_t row_k  = d_k*n_kv_h;
    const int64_t row_v  = d_v*n_kv_h;
    const int64_t bs     = p.block_size;
    const int64_t n_sel  = shape.n_sel;
    const int64_t n_blk_rows = n_sel*bs;
    const int64_t n_mem  = infllm_n_mem(p, shape.memory, shape.n_sel);
    const int64_t m0     = c->n_mem_max - n_mem;       // first working-set row attended: the last n_sel slots
    const int64_t n_att  = llama_kv_cache_infllm::n_attended(n_mem, shape.n_ring);   // blocks, sinks, ring, padding
    const bool    rotate = !p.absolute && rope.used;   // memory keys are stored at position 0

    // K and V reach the cache as views of a fused QKV projection when no RoPE made them new
    // tensors (StarCoder, GPT-2): the ring writes and the selection read them as rows
    if (!ggml_is_contiguous(k_cur)) {
        k_cur = ggml_cont(ctx0, k_cur);
    }
    if (!ggml_is_contiguous(v_cur)) {
        v_cur = ggml_cont(ctx0, v_cur);
    }
    // quantized K/V: as llama.cpp's cache, keys and queries (and values, the output undoing it)
    // are turned by an orthonormal Hadamard matrix before the rows are quantized, which spreads
    // outliers over the block. Everything the attention reads is in that basis; RoPE does not
    // commute with it, so a re-positioning turns keys back first. The selection works on the
    // model's own Q and K (representative keys are sums of plain keys).
    auto hk = [&](ggml_tensor * x) { return c->k_rot ? llama_mul_mat_hadamard(ctx0, x, c->k_rot) : x; };
    auto hv = [&](ggml_tensor * x) { return c->v_rot ? llama_mul_mat_hadamard(ctx0, x, c->v_rot) : x; };
    // re-position keys in the rotated basis: out of it, RoPE by pos, back into it
    auto reposition = [&](ggml_tensor * x, ggml_tensor * pos) { return hk(infllm_rope(ctx0, rope, hk(x), pos)); };
    ggml_tensor * q_att = hk(q_cur);   // the query the attention uses
    k_cur = hk(k_cur);
    v_cur = hv(v_cur);
    ggml_build_forward_expand(gf, q_att);
    ggml_build_forward_expand(gf, v_cur);
    ggml_build_forward_expand(gf, k_cur);

    auto hand_over = [&](ggml_tensor * t, const char * prefix) {
        ggml_format_name(t, "%s%d", prefix, il);
        ggml_set_output(t);
        ggml_build_forward_expand(gf, t);
    };

    // the chunk's summed query as it sees keys stored at position 0, per KV head summed over
    // its query heads: a block's score is its representative key's dot product with it
    ggml_tensor * q_chunk = nullptr;
    auto chunk_query = [&]() {
        if (q_chunk == nullptr) {
            const int64_t n_gqa = n_head/n_kv_h;
            ggml_tensor * qs = ggml_cont(ctx0, ggml_permute(ctx0, q_cur, 1, 2, 0, 3));    // [n_q, d_k, n_head]
            qs = ggml_reshape_3d(ctx0, ggml_sum_rows(ctx0, qs), d_k, n_head, 1);
            if (rotate) {
                qs = infllm_rope(ctx0, rope, qs, inp->sel_pos);
            }
            qs = ggml_reshape_3d(ctx0, qs, d_k, n_gqa, n_kv_h);
            qs = ggml_sum_rows(ctx0, ggml_cont(ctx0, ggml_permute(ctx0, qs, 1, 0, 2, 3)));  // [1, d_k, n_kv_h]
            q_chunk = ggml_reshape_2d(ctx0, qs, row_k, 1);
        }
        return q_chunk;
    };

    //
    // eviction: the rows that leave the window are read from the ring before this ubatch's
    // writes can reach them (explicit edges below), their keys rotated back to position 0, and
    // stored: in the pool (resident) or the eviction buffer, which the cache copies to the host
    // store at the evict node (offload). Their representative keys are written in-graph.
    //

    ggml_tensor * k_pool  = L.k_pool;    // the pool / sinks / repr as the readers must see them
    ggml_tensor * v_pool  = L.v_pool;
    ggml_tensor * k_sinks = L.k_sinks;
    ggml_tensor * v_sinks = L.v_sinks;
    ggml_tensor * repr    = L.repr;
    ggml_tensor * k_read  = nullptr;     // the ring reads that must precede the ring writes
    ggml_tensor * v_read  = nullptr;
    ggml_tensor * ks_read = nullptr;
    ggml_tensor * vs_read = nullptr;

    if (shape.ev_sinks) {
        ks_read = ggml_get_rows(ctx0, L.k_work, inp->sink_cells);                            // F32 [row_k, n_init]
        vs_read = ggml_get_rows(ctx0, L.v_work, inp->sink_cells);
        ggml_tensor * ks = ks_read;
        if (rotate) {
            ks = ggml_reshape_2d(ctx0, reposition(ggml_reshape_3d(ctx0, ks, d_k, n_kv_h, p.n_init), inp->sink_pos),
                                 row_k, p.n_init);
        }
        k_sinks = ggml_cpy(ctx0, ks, L.k_sinks);
        v_sinks = ggml_cpy(ctx0, vs_read, L.v_sinks);
        ggml_build_forward_expand(gf, k_sinks);   // stored whether or not this ubatch reads them
        ggml_build_forward_expand(gf, v_sinks);
    }
    if (shape.n_ev > 0) {
        const int64_t n_rows = shape.n_ev*bs;
        k_read = ggml_get_rows(ctx0, L.k_work, inp->ev_cells);                               // F32 [row_k, n_rows]
        v_read = ggml_get_rows(ctx0, L.v_work, inp->ev_cells);
        // the keys at position 0 (representative keys are sums of these); a layer without RoPE
        // stores its keys as they are
        ggml_tensor * k_plain = hk(k_read);
        ggml_tensor * k0 = !rope.used ? k_plain : ggml_reshape_2d(ctx0,
                infllm_rope(ctx0, rope, ggml_reshape_3d(ctx0, k_plain, d_k, n_kv_h, n_rows), inp->ev_pos), row_k, n_rows);
        ggml_tensor * ks = rotate ? hk(k0) : k_read;   // the stored form
        if (c->resident) {
            k_pool = ggml_set_rows(ctx0, L.k_pool, ks, inp->ev_dst);
            v_pool = ggml_set_rows(ctx0, L.v_pool, v_read, inp->ev_dst);
            ggml_build_forward_expand(gf, k_pool);
            ggml_build_forward_expand(gf, v_pool);
        } else {
            ggml_tensor * ke = ggml_set_rows(ctx0, L.k_evict, ks, inp->ev_dst);
            ggml_tensor * ve = ggml_set_rows(ctx0, L.v_evict, v_read, inp->ev_dst);
            // the hand-over reads the buffers: a view computed after both writes, on the device.
            // It computes nothing
            hand_over(infllm_after(ctx0, ke, {ve}), llama_kv_cache_infllm::EVICT_NODE);
        }
        // representative keys (at position 0): the sum of each block's keys, or with repr_keys
        // = r the sum of the r keys this chunk's query attends to most (InfLLM's
        // representative tokens; a sum of r keys scores a block as the sum of their scores)
        if (c->n_sel > 0) {
            ggml_tensor * keys = ggml_reshape_3d(ctx0, k0, row_k, bs, shape.n_ev);
            const int64_t r = p.repr_keys;
            if (r > 0 && r < bs) {
                ggml_tensor * sc = ggml_reshape_2d(ctx0, ggml_mul_mat(ctx0, k0, chunk_query()), bs, shape.n_ev);
                // one pick is an argmax (ggml-vulkan's top-k shortcut for k = 1, see below)
                ggml_tensor * top = r == 1 ? ggml_reshape_2d(ctx0, ggml_argmax(ctx0, sc), 1, shape.n_ev)
                                           : ggml_top_k(ctx0, sc, (int) r);                  // I32 [r, n_ev]
                keys = ggml_get_rows(ctx0, keys, top);                                        // [row_k, r, n_ev]
            }
            ggml_tensor * sums = ggml_cont(ctx0, ggml_permute(ctx0, keys, 1, 0, 2, 3));
            sums = ggml_reshape_2d(ctx0, ggml_sum_rows(ctx0, sums), row_k, shape.n_ev);     // [row_k, n_ev]
            repr = ggml_set_rows(ctx0, L.repr, sums, inp->ev_blk);
            ggml_build_forward_expand(gf, repr);
        }
    }

    //
    // this ubatch's keys and values into the ring, after the eviction read the cells
    //

    ggml_tensor * k_ring = ggml_set_rows(ctx0, infllm_after(ctx0, L.k_work, {k_read, ks_read}),
                                         ggml_reshape_2d(ctx0, k_cur, row_k, n_q), inp->ring_idx);
    ggml_tensor * v_ring = ggml_set_rows(ctx0, infllm_after(ctx0, L.v_work, {v_read, vs_read}),
                                         ggml_reshape_2d(ctx0, v_cur, row_v, n_q), inp->ring_idx);

    //
    // selection: top-k blocks by sum over heads of q̄·repr, q̄ the chunk's summed query seen from the
    // memory position. Resident: the ids are the pool slots. Offload: the scheduler stops at the
    // selection, the cache makes the picked blocks resident and writes their slots to L.sel.
    //

    ggml_tensor * slots = nullptr;
    ggml_tensor * blk_ids = nullptr;   // the picked blocks (in offload mode not their pool slots)
    if (n_sel > 0) {
        ggml_tensor * qs = chunk_query();
        ggml_tensor * scores = ggml_add(ctx0, ggml_mul_mat(ctx0, repr, qs),
                                        ggml_reshape_2d(ctx0, inp->blk_bias, c->n_blocks, 1));  // [n_blocks, 1]
        // n_sel <= memory blocks, so every pick has a finite score. One pick is an argmax:
        // ggml-vulkan's top-k shortcut for k = 1 compares float bits as signed integers and
        // prefers -inf to any negative score
        ggml_tensor * ids = n_sel == 1 ? ggml_argmax(ctx0, scores) : ggml_top_k(ctx0, scores, n_sel);
        if (shape.packed && n_sel > 1) {
            // packed positions go by the picks' order in the context: the ids sorted (top-k leaves
            // them in no particular order)
            ggml_tensor * order = ggml_argsort(ctx0, ggml_cast(ctx0, ids, GGML_TYPE_F32), GGML_SORT_ORDER_ASC);
            ids = ggml_cont_1d(ctx0, ggml_get_rows(ctx0, ggml_reshape_2d(ctx0, ids, 1, n_sel), order), n_sel);
        }
        blk_ids = ids;
        if (c->resident) {
            slots = ids;
        } else {
            hand_over(ids, llama_kv_cache_infllm::SYNC_NODE);
            // the cache wrote the pool and L.sel at the hand-over: read both after it
            slots  = ggml_view_1d(ctx0, infllm_after(ctx0, L.sel, {ids}), n_sel, 0);
            k_pool = infllm_after(ctx0, L.k_pool, {ids});
            v_pool = infllm_after(ctx0, L.v_pool, {ids});
        }
    }

    //
    // attention: one softmax over the picked blocks, the sinks and the window
    //

    // at true positions every memory key has its own rotation: the kernel turns them by their
    // offset in the block, which RoPE does not commute with in the Hadamard basis of quantized K
    const bool turn = (shape.true_pos || shape.packed) && rotate;
    if (n_q == 1 && c->one_query_kernel && !(turn && c->k_rot) && ggml_is_contiguous(q_att) && q_att->type == GGML_TYPE_F32) {
        // decode step on the CPU backend: our single-query kernel reads the blocks in the pool
        // and the sinks where they are stored, with the query rotated to see them, and the ring
        // (llama-infllm-attn-cpu.h); nothing is gathered per step
        llama_infllm_attn_memory mem = {};
        if (shape.memory) {
            mem.k_pool = k_pool;
            mem.v_pool = v_pool;
            mem.slots  = slots;
            mem.k_sinks = k_sinks;
            mem.v_sinks = v_sinks;
            mem.block_size = (int) bs;
            if (turn) {
                // row i of a block that starts at position s scores (R(-s) q) . (R(i) k): a query
                // per block, and a table of R(0) .. R(max(bs, n_init) - 1) that turns the keys
                // (true: the sinks start at position 0; packed: the blocks' starts go by their order)
                mem.q = shape.packed ? infllm_rope(ctx0, rope, q_cur, inp->pk_sneg) : q_cur;
                if (n_sel > 0) {
                    ggml_tensor * qb = ggml_repeat_4d(ctx0, q_cur, d_k, n_head, n_sel, 1);
                    mem.q_blocks = infllm_rope(ctx0, rope, qb, ggml_reshape_1d(ctx0, shape.packed ? inp->pk_neg
                            : ggml_get_rows(ctx0, inp->blk_tneg, blk_ids), n_sel));
                }
                const int64_t n_off = inp->sink_tpos->ne[0];
                const bool    neox  = rope.mode == GGML_ROPE_TYPE_NEOX;
                mem.rot = infllm_rope(ctx0, rope, llama_infllm_attn_rot_unit(ctx0, q_cur, d_k, n_off, rope.n_dims, neox),
                                      inp->sink_tpos);
                mem.rope_dims = rope.n_dims;
                mem.rope_neox = neox;
            } else {
                // the query as it sees memory keys stored at position 0
                mem.q = hk(rotate ? infllm_rope(ctx0, rope, q_cur, inp->sel_pos) : q_cur);
            }
        }
        const int n_chunks = (int) std::clamp<int64_t>(n_att/256, 1, 32);
        ggml_tensor * out = llama_infllm_attn_one_query_cpu(ctx0, q_att,
                infllm_rows_3d(ctx0, k_ring, d_k, c->n_mem_max, n_att - n_mem),
                infllm_rows_3d(ctx0, v_ring, d_v, c->n_mem_max, n_att - n_mem),
                shape.memory ? &mem : nullptr, inp->kq_mask, kq_scale, n_chunks);
        return infllm_output(g, hv(out), wo, wo_b, wo_s, il);
    }

    // flash attention needs its rows in one tensor: the picked blocks and the sinks are copied
    // into the working rows before the ring, keys rotated to the memory position, or with
    // true_pos to their own positions (a block's are looked up by its id)
    ggml_tensor * k_mem_w[2] = {nullptr, nullptr};
    ggml_tensor * v_mem_w[2] = {nullptr, nullptr};
    if (n_sel > 0) {
        const int64_t n_slots = L.k_pool->ne[1]/bs;
        ggml_tensor * kb = ggml_get_rows(ctx0, ggml_reshape_2d(ctx0, k_pool, row_k*bs, n_slots), slots);   // F32 [row_k*bs, n_sel]
        ggml_tensor * vb = ggml_get_rows(ctx0, ggml_reshape_2d(ctx0, v_pool, row_v*bs, n_slots), slots);
        kb = ggml_reshape_3d(ctx0, kb, d_k, n_kv_h, n_blk_rows);
        if (rotate) {
            kb = reposition(kb, shape.true_pos ? ggml_reshape_1d(ctx0, ggml_get_rows(ctx0, inp->blk_tpos, blk_ids), n_blk_rows)
                              : shape.packed   ? ggml_reshape_1d(ctx0, inp->pk_pos, n_blk_rows)
                              :                  ggml_view_1d(ctx0, inp->mem_pos, n_blk_rows, 0));
        }
        k_mem_w[0] = ggml_cpy(ctx0, kb, infllm_rows_3d(ctx0, L.k_work, d_k, m0, n_blk_rows));
        v_mem_w[0] = ggml_cpy(ctx0, ggml_reshape_3d(ctx0, vb, d_v, n_kv_h, n_blk_rows),
                              infllm_rows_3d(ctx0, L.v_work, d_v, m0, n_blk_rows));
    }
    if (shape.memory && p.n_init > 0) {
        const int64_t r0 = c->n_mem_max - p.n_init;
        ggml_tensor * ks = infllm_rows_3d(ctx0, k_sinks, d_k, 0, p.n_init);
        if (rotate) {
            ks = reposition(ks, shape.true_pos ? ggml_view_1d(ctx0, inp->sink_tpos, p.n_init, 0)
                              : shape.packed   ? inp->pk_sink
                              :                  ggml_view_1d(ctx0, inp->mem_pos, p.n_init, 0));
        }
        k_mem_w[1] = ggml_cpy(ctx0, ks, infllm_rows_3d(ctx0, L.k_work, d_k, r0, p.n_init));
        v_mem_w[1] = ggml_cpy(ctx0, infllm_rows_3d(ctx0, v_sinks, d_v, 0, p.n_init),
                              infllm_rows_3d(ctx0, L.v_work, d_v, r0, p.n_init));
    }
    ggml_tensor * k_att = infllm_after(ctx0, k_ring, {k_mem_w[0], k_mem_w[1]});
    ggml_tensor * v_att = infllm_after(ctx0, v_ring, {v_mem_w[0], v_mem_w[1]});

    ggml_tensor * k = infllm_rows_3d(ctx0, k_att, d_k, m0, n_att);    // [d_k, n_kv_h, n_att]
    ggml_tensor * v = infllm_rows_3d(ctx0, v_att, d_v, m0, n_att);
    // as llama.cpp's flash-attention path does: an F32 cache is attended in F16
    if (k->type == GGML_TYPE_F32) {
        k = ggml_cast(ctx0, k, GGML_TYPE_F16);
    }
    if (v->type == GGML_TYPE_F32) {
        v = ggml_cast(ctx0, v, GGML_TYPE_F16);
    }
    ggml_tensor * q = ggml_permute(ctx0, q_att, 0, 2, 1, 3);          // [d_k, n_q, n_head]
    // Gemma 2's attention logit soft-capping, as llama.cpp's flash-attention path passes it
    const float softcap = g.hparams.attn_soft_cap ? g.hparams.f_attn_logit_softcapping : 0.0f;
    ggml_tensor * fa = ggml_flash_attn_ext(ctx0, q, ggml_permute(ctx0, k, 0, 2, 1, 3), ggml_permute(ctx0, v, 0, 2, 1, 3),
                                           inp->kq_mask, kq_scale, 0.0f, softcap);
    ggml_prec_set_acc(fa, GGML_PREC_F32);
    return infllm_output(g, hv(ggml_reshape_2d(ctx0, fa, d_v*n_head, n_q)), wo, wo_b, wo_s, il);
}

ggml_tensor * llama_infllm_build_attn_iswa(
        const llm_graph_context & g,
        llm_graph_input_attn_kv_iswa * inp,
        ggml_tensor * wo,
        ggml_tensor * wo_b,
        ggml_tensor * wo_s,
        ggml_tensor * q_cur,
        ggml_tensor * k_cur,
        ggml_tensor * v_cur,
        ggml_tensor * kq_b,
        ggml_tensor * sinks,
        ggml_tensor * v_mla,
        float         kq_scale,
        int           il) {
    auto * ours = dynamic_cast<llm_graph_input_attn_infllm_iswa *>(inp);
    if (ours == nullptr || g.hparams.is_swa((uint32_t) il)) {
        return nullptr;   // the stock path: another cache, or a sliding-window layer
    }
    if (k_cur == nullptr || v_cur == nullptr || v_mla != nullptr) {
        infllm_refuse(g, "layer " + std::to_string(il) + " attends without its own K and V (shared or latent K/V)");
    }
    return llama_infllm_build_attn(g, ours->infllm.get(), wo, wo_b, wo_s, q_cur, k_cur, v_cur, kq_b, sinks, kq_scale, il);
}
