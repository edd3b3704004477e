#include "llama-kv-cache-infllm.h"
#include "llama-infllm-attn-cpu.h"

#include "llama-impl.h"
#include "llama-io.h"
#include "llama-model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

//
// llama_kv_cache_infllm
//

static uint32_t infllm_ring_size(const llama_infllm_params & p, uint32_t n_ctx, uint32_t n_ubatch) {
    // the window of a ubatch spans [ls, p_last]: at most n_local + max(n_init, block_size) + n_ubatch
    // positions; `rewind` more cells keep the positions before it, so that the tail of the
    // context can be removed and evaluated again (seq_rm)
    const uint64_t need = (uint64_t) p.n_local + std::max(p.n_init, p.block_size) + n_ubatch + p.rewind;
    return (uint32_t) std::min<uint64_t>(n_ctx, need);
}

// blocks that can ever leave the window: the last ubatch starts at n_ctx - 1 at the latest,
// and its window (window_start) keeps n_local positions and the n_init sinks
static uint32_t infllm_n_blocks(const llama_infllm_params & p, uint32_t n_ctx) {
    const uint64_t last = n_ctx > 0 ? n_ctx - 1 : 0;
    const uint64_t kept = (uint64_t) p.n_local + p.n_init;
    return last > kept ? (uint32_t) ((last - kept)/p.block_size) : 0;
}

// the sinks are stored unquantized (F16): they are re-rotated in place (RoPE takes F32/F16)
// and few
static ggml_type infllm_sink_type(ggml_type t) {
    return ggml_is_quantized(t) ? GGML_TYPE_F16 : t;
}

static uint32_t infllm_n_sel(const llama_infllm_params & p, uint32_t n_ctx) {
    return std::min(p.topk, infllm_n_blocks(p, n_ctx));
}

// blocks that can leave the window in one ubatch: the window start moves by at most the
// ubatch's tokens rounded up to a block, plus one block for alignment
static uint32_t infllm_n_ev_max(const llama_infllm_params & p, uint32_t n_ctx, uint32_t n_ubatch) {
    return std::min(infllm_n_blocks(p, n_ctx), n_ubatch/p.block_size + 1);
}

static constexpr size_t INFLLM_TENSOR_PAD = 512;   // allocation padding allowance per tensor

// the size of the Hadamard rotation llama.cpp's cache applies to quantized K (is_k) or V rows
// of heads of d values, 0 for none: K the largest power of two from 64 dividing d, V 64;
// LLAMA_ATTN_ROT_DISABLE=1 turns it off there and here
static uint32_t infllm_rot_size(ggml_type type, uint32_t d, bool is_k) {
    const char * env = std::getenv("LLAMA_ATTN_ROT_DISABLE");
    if ((env && std::atoi(env)) || !ggml_is_quantized(type) || d == 0 || d % 64 != 0) {
        return 0;
    }
    uint32_t n = 64;
    while (is_k && d % (2*n) == 0) {
        n *= 2;
    }
    return n;
}

// an orthonormal Walsh-Hadamard matrix of order n (a power of two), row-major: H*H = I
static std::vector<float> infllm_hadamard(uint32_t n) {
    std::vector<float> h((size_t) n*n);
    const float a = 1.0f/std::sqrt((float) n);
    for (uint32_t i = 0; i < n; ++i) {
        for (uint32_t j = 0; j < n; ++j) {
            h[(size_t) i*n + j] = (__builtin_popcount(i & j) & 1) ? -a : a;   // Sylvester's construction
        }
    }
    return h;
}

llama_kv_cache_infllm::footprint llama_kv_cache_infllm::device_footprint(
        const llama_model & model, const llama_infllm_params & p, ggml_type type_k, ggml_type type_v,
        uint32_t n_ctx, uint32_t n_ubatch, bool resident, const layer_filter_cb & filter) {
    const auto & hp = model.hparams;
    const uint32_t n_blocks  = infllm_n_blocks(p, n_ctx);
    const uint32_t n_sel     = infllm_n_sel(p, n_ctx);
    const uint32_t n_mem_max = p.n_init + n_sel*p.block_size;
    const uint32_t n_ring    = infllm_ring_size(p, n_ctx, n_ubatch);
    const uint32_t n_ev_rows = infllm_n_ev_max(p, n_ctx, n_ubatch)*p.block_size;
    footprint f = {0, 0};
    for (const uint32_t n : {infllm_rot_size(type_k, hp.n_embd_head_k(), true), infllm_rot_size(type_v, hp.n_embd_head_v(), false)}) {
        f.fixed += n > 0 ? (size_t) n*n*sizeof(float) + INFLLM_TENSOR_PAD : 0;
    }
    for (uint32_t il = 0; il < hp.n_layer(); ++il) {
        if (filter && !filter((int32_t) il)) {
            continue;
        }
        const size_t k_row = ggml_row_size(type_k, hp.n_embd_k_gqa(il));
        const size_t v_row = ggml_row_size(type_v, hp.n_embd_v_gqa(il));
        f.fixed += (k_row + v_row)*(n_mem_max + n_ring + ATT_PAD - 1);
        f.fixed += (ggml_row_size(infllm_sink_type(type_k), hp.n_embd_k_gqa(il)) +
                    ggml_row_size(infllm_sink_type(type_v), hp.n_embd_v_gqa(il)))*p.n_init;
        f.fixed += ggml_row_size(GGML_TYPE_F32, hp.n_embd_k_gqa(il))*std::max(n_blocks, 1u);
        f.fixed += 6*INFLLM_TENSOR_PAD;
        if (!resident) {
            f.fixed += (k_row + v_row)*std::max(n_ev_rows, 1u) + sizeof(int32_t)*std::max(n_sel, 1u) + 3*INFLLM_TENSOR_PAD;
        }
        f.per_block += (k_row + v_row)*p.block_size;
    }
    return f;
}

static std::string infllm_mib(size_t bytes) {
    return std::to_string((bytes + (1u << 20) - 1) >> 20) + "MiB";
}

llama_kv_cache_infllm::llama_kv_cache_infllm(
        const llama_model & model, const llama_infllm_params & params,
        ggml_type type_k, ggml_type type_v, bool offload, uint32_t n_ctx, uint32_t n_ubatch,
        const layer_filter_cb & filter) :
    params(params),
    hparams(model.hparams),
    n_ctx(n_ctx),
    n_ring(infllm_ring_size(params, n_ctx, n_ubatch)),
    n_blocks(infllm_n_blocks(params, n_ctx)),
    n_sel(infllm_n_sel(params, n_ctx)),
    n_mem_max(n_sel*params.block_size + params.n_init),
    n_ubatch(n_ubatch),
    n_ev_max(infllm_n_ev_max(params, n_ctx, n_ubatch)) {
    // the pool: every block (resident) when the budget allows it, else as many as fit (offload),
    // at least the blocks of one selection
    if (params.budget_bytes > 0) {
        const footprint fr = device_footprint(model, params, type_k, type_v, n_ctx, n_ubatch, true, filter);
        const footprint fo = device_footprint(model, params, type_k, type_v, n_ctx, n_ubatch, false, filter);
        const size_t all     = fr.fixed + (size_t) n_blocks*fr.per_block;
        const size_t minimum = std::min(all, fo.fixed + (size_t) n_sel*fo.per_block);
        if (params.budget_bytes >= all) {
            resident = true;
            n_pool   = n_blocks;
        } else if (params.budget_bytes < minimum) {
            throw std::invalid_argument("kv_budget of " + std::to_string(params.budget_bytes) +
                " bytes is below the minimum of " + std::to_string(minimum) + " bytes ('" + infllm_mib(minimum) +
                "' is enough) that this model and config need on the device (local window, sinks, the blocks of one "
                "selection, eviction buffers and representative keys for n_ctx = " + std::to_string(n_ctx) + ")");
        } else {
            resident = false;
            n_pool   = (uint32_t) std::min<size_t>(n_blocks, (params.budget_bytes - fo.fixed)/fo.per_block);
        }
    } else if (params.cache_blocks >= 0 && (uint32_t) params.cache_blocks < n_blocks) {
        if ((uint32_t) params.cache_blocks < n_sel) {
            throw std::invalid_argument("cache_blocks = " + std::to_string(params.cache_blocks) +
                " is below the blocks of one selection (topk = " + std::to_string(n_sel) + "): the device must hold them");
        }
        resident = false;
        n_pool   = (uint32_t) params.cache_blocks;
    } else {
        resident = true;
        n_pool   = n_blocks;
    }

    ggml_backend_buffer_type_t buft = ggml_backend_cpu_buffer_type();
    bool first = true;
    for (uint32_t il = 0; offload && il < hparams.n_layer(); ++il) {
        if (filter && !filter((int32_t) il)) {
            continue;
        }
        ggml_backend_buffer_type_t b = ggml_backend_dev_buffer_type(model.dev_layer(il));
        if (!first && b != buft) {
            throw std::runtime_error("InfLLM cache: layers split over several devices are not supported");
        }
        buft  = b;
        first = false;
    }

    {
        const char * env = std::getenv("PYLLAMA_INF_ATTN");
        // not with attention logit soft-capping (Gemma 2): ggml's flash attention applies it
        one_query_kernel = buft == ggml_backend_cpu_buffer_type() && !hparams.attn_soft_cap &&
                           llama_infllm_attn_cpu_type_ok(type_k) &&
                           llama_infllm_attn_cpu_type_ok(type_v) && !(env && std::strcmp(env, "ggml") == 0);
    }

    ggml_init_params ip = {
        /*.mem_size   =*/ size_t((10u*hparams.n_layer() + 2)*ggml_tensor_overhead()),   // 10 per layer, 2 rotations
        /*.mem_buffer =*/ nullptr,
        /*.no_alloc   =*/ true,
    };
    ggml_context * ctx = ggml_init(ip);
    if (!ctx) {
        throw std::runtime_error("failed to create a ggml context for the InfLLM cache");
    }
    ctx_tensors.reset(ctx);

    const uint32_t bs = params.block_size;
    std::vector<size_t> k_rows, v_rows;
    for (uint32_t il = 0; il < hparams.n_layer(); ++il) {
        if (filter && !filter((int32_t) il)) {
            continue;
        }
        const uint32_t n_embd_k = hparams.n_embd_k_gqa(il);
        const uint32_t n_embd_v = hparams.n_embd_v_gqa(il);
        auto tensor = [&](ggml_type type, int64_t ne0, int64_t ne1, const char * name) {
            ggml_tensor * t = ggml_new_tensor_2d(ctx, type, ne0, ne1);
            ggml_format_name(t, "infllm_%s_l%d", name, il);
            return t;
        };

        layer l = {};
        l.il     = il;
        l.k_work = tensor(type_k, n_embd_k, n_mem_max + n_ring + ATT_PAD - 1, "k_work");
        l.v_work = tensor(type_v, n_embd_v, n_mem_max + n_ring + ATT_PAD - 1, "v_work");
        l.k_pool = tensor(type_k, n_embd_k, std::max(n_pool, 1u)*bs, "k_pool");
        l.v_pool = tensor(type_v, n_embd_v, std::max(n_pool, 1u)*bs, "v_pool");
        l.repr   = tensor(GGML_TYPE_F32, n_embd_k, std::max(n_blocks, 1u), "repr");
        if (params.n_init > 0) {
            l.k_sinks = tensor(infllm_sink_type(type_k), n_embd_k, params.n_init, "k_sinks");
            l.v_sinks = tensor(infllm_sink_type(type_v), n_embd_v, params.n_init, "v_sinks");
        }
        if (!resident) {
            l.sel     = tensor(GGML_TYPE_I32, std::max(n_sel, 1u), 1, "sel");
            l.k_evict = tensor(type_k, n_embd_k, std::max(n_ev_max*bs, 1u), "k_evict");
            l.v_evict = tensor(type_v, n_embd_v, std::max(n_ev_max*bs, 1u), "v_evict");
        }
        work_bytes += ggml_nbytes(l.k_work) + ggml_nbytes(l.v_work) +
                      (l.k_sinks ? ggml_nbytes(l.k_sinks) + ggml_nbytes(l.v_sinks) : 0) +
                      (l.sel ? ggml_nbytes(l.sel) + ggml_nbytes(l.k_evict) + ggml_nbytes(l.v_evict) : 0);
        pool_bytes += ggml_nbytes(l.k_pool) + ggml_nbytes(l.v_pool);
        repr_bytes += ggml_nbytes(l.repr);
        k_rows.push_back(l.k_work->nb[1]);
        v_rows.push_back(l.v_work->nb[1]);

        map_layer_ids[il] = layers.size();
        layers.push_back(l);
    }
    k_row_bytes = k_rows.empty() ? 0 : k_rows[0];
    v_row_bytes = v_rows.empty() ? 0 : v_rows[0];

    const uint32_t n_rot_k = infllm_rot_size(type_k, hparams.n_embd_head_k(), true);
    const uint32_t n_rot_v = infllm_rot_size(type_v, hparams.n_embd_head_v(), false);
    if (n_rot_k > 0) {
        k_rot = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_rot_k, n_rot_k);
        ggml_set_name(k_rot, "infllm_k_rot");
    }
    if (n_rot_v > 0) {
        v_rot = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_rot_v, n_rot_v);
        ggml_set_name(v_rot, "infllm_v_rot");
    }

    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
    if (!buf) {
        throw std::runtime_error("failed to allocate the InfLLM cache buffer");
    }
    // unwritten cells are masked, but must not hold NaNs (0 * NaN poisons the attention)
    ggml_backend_buffer_clear(buf, 0);
    buf_device.reset(buf);
    for (ggml_tensor * r : {k_rot, v_rot}) {
        if (r != nullptr) {
            const std::vector<float> h = infllm_hadamard((uint32_t) r->ne[0]);
            ggml_backend_tensor_set(r, h.data(), 0, ggml_nbytes(r));
        }
    }

    std::string host_desc = "none (every block on the device)";
    if (!resident) {
        // the host tier: the device's host buffer type (pinned memory) where it has one
        ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
        ggml_backend_buffer_type_t host_buft = dev ? ggml_backend_dev_host_buffer_type(dev) : nullptr;
        if (host_buft == nullptr) {
            host_buft = ggml_backend_cpu_buffer_type();
        }
        store = std::make_unique<llama_infllm_host_store>(host_buft, k_rows, v_rows, bs, 32u);
        if (params.host_budget > 0 && store->bytes_for(n_blocks) > params.host_budget) {
            throw std::invalid_argument("host_budget of " + std::to_string(params.host_budget) +
                " bytes is too small: the host block store needs up to " + std::to_string(store->bytes_for(n_blocks)) +
                " bytes for n_ctx = " + std::to_string(n_ctx));
        }
        xfer = std::make_unique<llama_infllm_transfer>(dev ? dev : ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU));
        sel_host.reset(ggml_backend_buft_alloc_buffer(host_buft, 2*std::max<size_t>(n_sel, 1)*sizeof(int32_t)));
        if (!sel_host) {
            throw std::runtime_error("InfLLM cache: could not allocate host memory for the selection");
        }
        host_desc = std::string(ggml_backend_buft_name(host_buft)) + " via " + xfer->name();
    }

    states.resize(layers.size());
    clear(true);

    LLAMA_LOG_INFO("%s: %10s InfLLM cache: %7.2f MiB (working sets %.2f, pool %u blocks %.2f, repr %.2f), %s, host store %s\n",
            __func__, ggml_backend_buffer_name(buf), ggml_backend_buffer_get_size(buf)/1024.0/1024.0,
            work_bytes/1024.0/1024.0, n_pool, pool_bytes/1024.0/1024.0, repr_bytes/1024.0/1024.0,
            resident ? "resident" : "offload", host_desc.c_str());
    LLAMA_LOG_INFO("%s: n_ctx = %u, ring = %u cells, blocks = %u x %u, select %u, n_init = %u, n_local = %u, positions = %s\n",
            __func__, n_ctx, n_ring, n_blocks, params.block_size, n_sel, params.n_init, params.n_local,
            params.absolute ? "absolute" : params.packed ? (params.true_below > 0 ? "true, then packed" : "packed")
                                               : (params.true_below > 0 ? "true, then infllm" : "infllm"));
}

llama_kv_cache_infllm::~llama_kv_cache_infllm() {
    // copies still queued (the last ubatch's eviction) read the device buffers and write the
    // host store: both are freed with the members, so the copies must finish first
    if (xfer) {
        xfer->wait();
    }
}

llama_pos llama_kv_cache_infllm::window_start(llama_pos p0) const {
    const llama_pos base = p0 - (llama_pos) params.n_local;
    const llama_pos n_init = (llama_pos) params.n_init;
    if (base <= n_init) {
        return 0;
    }
    const llama_pos bs = (llama_pos) params.block_size;
    return n_init + ((base - n_init)/bs)*bs;
}

uint32_t llama_kv_cache_infllm::n_evicted(llama_pos ls) const {
    if (ls < (llama_pos) params.n_init || ls == 0) {
        return 0;
    }
    return std::min<uint32_t>(n_blocks, (uint32_t) (ls - params.n_init)/params.block_size);
}

uint32_t llama_kv_cache_infllm::n_ring_used(llama_pos p_end) const {
    // like the stock cache, attend to the written cells rounded up to 256 until the ring is full
    return p_end >= (llama_pos) n_ring ? n_ring : std::min<uint32_t>(n_ring, GGML_PAD((uint32_t) p_end, 256u));
}

uint32_t llama_kv_cache_infllm::n_selected(llama_pos ls) const {
    return std::min(n_sel, n_evicted(ls));
}

const llama_kv_cache_infllm::layer & llama_kv_cache_infllm::get_layer(int32_t il) const {
    return layers.at(map_layer_ids.at(il));
}

llama_memory_context_ptr llama_kv_cache_infllm::init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
    GGML_UNUSED(embd_all);

    balloc.split_reset();
    std::vector<llama_ubatch> ubatches;
    llama_pos next = (llama_pos) n_tokens;
    while (true) {
        llama_ubatch ubatch = balloc.split_simple(n_ubatch);
        if (ubatch.n_tokens == 0) {
            break;
        }
        for (uint32_t i = 0; i < ubatch.n_tokens; ++i) {
            if (ubatch.n_seq_id[i] != 1 || ubatch.seq_id[i][0] != 0) {
                LLAMA_LOG_ERROR("%s: the InfLLM cache holds a single sequence (id 0)\n", __func__);
                return std::make_unique<llama_kv_cache_infllm_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
            }
            if (ubatch.pos[i] != next++) {
                LLAMA_LOG_ERROR("%s: the InfLLM cache only appends: expected position %d, got %d\n",
                        __func__, next - 1, ubatch.pos[i]);
                return std::make_unique<llama_kv_cache_infllm_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
            }
        }
        ubatches.push_back(std::move(ubatch));
    }
    if (balloc.get_n_used() < balloc.get_n_tokens() || next > (llama_pos) n_ctx) {
        return std::make_unique<llama_kv_cache_infllm_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }
    return std::make_unique<llama_kv_cache_infllm_context>(this, std::move(ubatches));
}

llama_memory_context_ptr llama_kv_cache_infllm::init_full() {
    return std::make_unique<llama_kv_cache_infllm_context>(this);
}

llama_memory_context_ptr llama_kv_cache_infllm::init_update(llama_context * lctx, bool optimize) {
    GGML_UNUSED(lctx);
    GGML_UNUSED(optimize);
    return std::make_unique<llama_kv_cache_infllm_context>(LLAMA_MEMORY_STATUS_NO_UPDATE);
}

void llama_kv_cache_infllm::clear(bool data) {
    if (xfer) {
        xfer->wait();   // nothing may still be copying into the store
    }
    d2h_pending  = false;
    n_tokens     = 0;
    n_stored     = 0;
    sinks_stored = false;
    cur          = {};
    // representative keys are written whole when a block is evicted and unevicted blocks are
    // never selected, so neither they nor the (masked) stale cells need zeroing
    for (auto & st : states) {
        st.slot_blk.assign(resident ? 0 : n_pool, -1);
        st.slot_used.assign(resident ? 0 : n_pool, 0);
        st.blk_slot.assign(resident ? 0 : n_blocks, -1);
        st.sel_slots.clear();
    }
    // the host store keeps its (pinned) buffers for the next sequence
    GGML_UNUSED(data);
}

void llama_kv_cache_infllm::begin_ubatch(llama_pos p0, uint32_t n_q) {
    if (d2h_pending) {
        xfer->wait();   // this ubatch rewrites the eviction buffers
        d2h_pending = false;
    }
    cur.ls = window_start(p0);
    const uint32_t n_ev = n_evicted(cur.ls);
    cur.ev_sinks = cur.ls > 0 && params.n_init > 0 && !sinks_stored;
    cur.ev_b0    = std::min(n_stored, n_ev);
    cur.ev_b1    = n_ev;
    GGML_ASSERT(cur.ev_b1 - cur.ev_b0 <= n_ev_max);   // positions only append
    if (store && cur.ev_b1 > cur.ev_b0) {
        store->reserve(cur.ev_b1);   // host memory before the compute, not in its callbacks
    }
    n_stored      = n_ev;
    sinks_stored |= cur.ev_sinks;
    if (n_ev > 0 && n_sel > 0) {
        selections += (int64_t) layers.size();
    }
    n_tokens = (uint32_t) (p0 + (llama_pos) n_q);
    ++n_ubatches;
}

void llama_kv_cache_infllm::eviction_rows(int32_t * cells, int32_t * neg_pos, int32_t * dst, int32_t * blk) const {
    const uint32_t bs = params.block_size;
    for (uint32_t b = cur.ev_b0; b < cur.ev_b1; ++b) {
        const uint32_t j = b - cur.ev_b0;
        if (blk) {
            blk[j] = (int32_t) b;
        }
        for (uint32_t i = 0; i < bs; ++i) {
            const llama_pos pos = (llama_pos) (params.n_init + b*bs + i);
            const uint32_t  r   = j*bs + i;
            if (cells) {
                cells[r] = (int32_t) (n_mem_max + pos % n_ring);
            }
            if (neg_pos) {
                neg_pos[r] = -pos;
            }
            if (dst) {
                // the pool row of the block (resident), else the row of the eviction buffer
                dst[r] = (int32_t) ((resident ? b : j)*bs + i);
            }
        }
    }
}

namespace {
// adds the scope's wall time to a counter
struct scope_timer {
    double & acc;
    const int64_t t0 = ggml_time_us();
    ~scope_timer() { acc += 1e-6*(double) (ggml_time_us() - t0); }
};
}

void llama_kv_cache_infllm::on_evict(int32_t il) {
    GGML_ASSERT(!resident);
    scope_timer t{host_work_s};
    ++n_callbacks;
    const uint32_t ix = (uint32_t) map_layer_ids.at(il);   // the store counts this cache's layers
    const layer & l = layers[ix];
    const size_t bs = params.block_size;
    for (uint32_t b = cur.ev_b0; b < cur.ev_b1; ++b) {
        const size_t j = b - cur.ev_b0;
        xfer->get(l.k_evict, store->k(ix, (int32_t) b), j*bs*k_row_bytes, bs*k_row_bytes);
        xfer->get(l.v_evict, store->v(ix, (int32_t) b), j*bs*v_row_bytes, bs*v_row_bytes);
    }
    d2h_pending = true;   // waited for at the next selection, or by the next ubatch
}

void llama_kv_cache_infllm::on_sync(int32_t il, const ggml_tensor * sel) {
    GGML_ASSERT(!resident);
    scope_timer timer{host_work_s};
    ++n_callbacks;
    const uint32_t ix = (uint32_t) map_layer_ids.at(il);   // the store counts this cache's layers
    const layer & l = layers[ix];
    layer_state & st = states[ix];
    const size_t bs = params.block_size;
    const int64_t stamp = ++n_sync;

    const uint32_t n = (uint32_t) ggml_nelements(sel);
    GGML_ASSERT(n <= n_sel && n <= n_pool);
    int32_t * ids   = (int32_t *) ggml_backend_buffer_get_base(sel_host.get());
    int32_t * slots = ids + n_sel;
    // the main backend is synchronised at a callback: the ids are read on the transfer backend
    xfer->get(sel, ids, 0, n*sizeof(int32_t), /*counted =*/ false);
    xfer->wait();   // also for this ubatch's evictions, which a miss may need
    d2h_pending = false;
    std::fill(slots, slots + n, -1);

    // hits first, so that no picked block is chosen as a victim
    for (uint32_t i = 0; i < n; ++i) {
        GGML_ASSERT(ids[i] >= 0 && (uint32_t) ids[i] < n_stored);
        const int32_t s = st.blk_slot[ids[i]];
        if (s >= 0) {
            slots[i] = s;
            st.slot_used[s] = stamp;
            ++blk_hits;
        }
    }
    for (uint32_t i = 0; i < n; ++i) {
        if (slots[i] >= 0) {
            continue;
        }
        // an empty slot, else the least recently used one that this selection does not want
        int32_t v = -1;
        for (uint32_t s = 0; s < n_pool; ++s) {
            if (st.slot_blk[s] < 0) {
                v = (int32_t) s;
                break;
            }
            if (st.slot_used[s] != stamp && (v < 0 || st.slot_used[s] < st.slot_used[v])) {
                v = (int32_t) s;
            }
        }
        GGML_ASSERT(v >= 0);
        if (st.slot_blk[v] >= 0) {
            st.blk_slot[st.slot_blk[v]] = -1;
        }
        const int32_t b = ids[i];
        xfer->set(l.k_pool, store->k(ix, b), (size_t) v*bs*k_row_bytes, bs*k_row_bytes);
        xfer->set(l.v_pool, store->v(ix, b), (size_t) v*bs*v_row_bytes, bs*v_row_bytes);
        st.slot_blk[v]  = b;
        st.slot_used[v] = stamp;
        st.blk_slot[b]  = v;
        slots[i] = v;
        ++blk_misses;
    }
    if (!std::equal(slots, slots + n, st.sel_slots.begin(), st.sel_slots.end())) {
        xfer->set(l.sel, slots, 0, n*sizeof(int32_t));
        st.sel_slots.assign(slots, slots + n);
    }
    xfer->wait();
}

bool llama_kv_cache_infllm::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (seq_id > 0) {
        return false;
    }
    p0 = std::max<llama_pos>(p0, 0);
    if (p1 >= 0 && p1 < (llama_pos) n_tokens) {
        return p1 <= p0;   // a hole in the sequence cannot be made; an empty range is no change
    }
    if (p0 == 0) {
        clear(true);
        return true;
    }
    if (p0 >= (llama_pos) n_tokens) {
        return true;   // nothing stored there
    }
    return can_truncate(p0) && (truncate(p0), true);
}

bool llama_kv_cache_infllm::can_truncate(llama_pos p) const {
    // the next ubatch at p attends to the ring cells of [window_start(p), p) (and, while the
    // window starts at 0, to the sinks there): position q went to cell q % n_ring, so the
    // positions written after p overwrote [p - n_ring, n_tokens - n_ring)
    return p > 0 && p <= (llama_pos) n_tokens && (llama_pos) n_tokens <= window_start(p) + (llama_pos) n_ring;
}

void llama_kv_cache_infllm::truncate(llama_pos p) {
    GGML_ASSERT(can_truncate(p));
    if (xfer) {
        xfer->wait();
    }
    d2h_pending = false;
    // blocks that are wholly before the window at p keep their stored copies (the same keys a
    // new eviction would write); later ones leave the window again when their turn comes
    const llama_pos ls = window_start(p);
    n_stored     = std::min(n_stored, n_evicted(ls));
    sinks_stored = sinks_stored && ls > 0;
    for (auto & st : states) {
        for (uint32_t s = 0; s < st.slot_blk.size(); ++s) {
            const int32_t b = st.slot_blk[s];
            if (b >= 0 && (uint32_t) b >= n_stored) {
                st.blk_slot[b]  = -1;
                st.slot_blk[s]  = -1;
                st.slot_used[s] = 0;
            }
        }
    }
    cur      = {};
    n_tokens = (uint32_t) p;
}

void llama_kv_cache_infllm::seq_cp(llama_seq_id, llama_seq_id, llama_pos, llama_pos) {
    LLAMA_LOG_WARN("%s: not supported by the InfLLM cache (single sequence)\n", __func__);
}

void llama_kv_cache_infllm::seq_keep(llama_seq_id seq_id) {
    if (seq_id != 0) {
        clear(true);
    }
}

void llama_kv_cache_infllm::seq_add(llama_seq_id, llama_pos, llama_pos, llama_pos shift) {
    if (shift != 0) {
        LLAMA_LOG_WARN("%s: position shifts are not supported by the InfLLM cache\n", __func__);
    }
}

void llama_kv_cache_infllm::seq_div(llama_seq_id, llama_pos, llama_pos, int d) {
    if (d != 1) {
        LLAMA_LOG_WARN("%s: position division is not supported by the InfLLM cache\n", __func__);
    }
}

llama_pos llama_kv_cache_infllm::seq_pos_min(llama_seq_id seq_id) const {
    return seq_id == 0 && n_tokens > 0 ? 0 : -1;
}

llama_pos llama_kv_cache_infllm::seq_pos_max(llama_seq_id seq_id) const {
    return seq_id == 0 ? (llama_pos) n_tokens - 1 : -1;
}

std::map<ggml_backend_buffer_type_t, size_t> llama_kv_cache_infllm::memory_breakdown() const {
    std::map<ggml_backend_buffer_type_t, size_t> ret;
    ret[ggml_backend_buffer_get_type(buf_device.get())] = ggml_backend_buffer_get_size(buf_device.get());
    return ret;
}

// the state: a header that must match this cache, the counters, then per layer the ring cells
// in use, the sinks once they left the window, and the representative keys and K/V rows of
// the stored blocks (from the pool when resident, from the host store otherwise)
static constexpr uint32_t INFLLM_STATE_MAGIC   = 0x4c464e49;   // "INFL"
static constexpr uint32_t INFLLM_STATE_VERSION = 1;

std::vector<uint32_t> llama_kv_cache_infllm::state_header() const {
    const ggml_type tk = layers.empty() ? GGML_TYPE_COUNT : layers[0].k_work->type;
    const ggml_type tv = layers.empty() ? GGML_TYPE_COUNT : layers[0].v_work->type;
    return {INFLLM_STATE_MAGIC, INFLLM_STATE_VERSION, (uint32_t) layers.size(), n_ctx, n_ring, n_blocks,
            params.block_size, params.n_init, params.n_local, params.topk, (uint32_t) params.absolute,
            (uint32_t) tk, (uint32_t) tv, (uint32_t) k_row_bytes, (uint32_t) v_row_bytes};
}

void llama_kv_cache_infllm::state_regions(uint32_t nt, uint32_t ns, bool sinks,
                                          const std::function<void(ggml_tensor *, size_t, size_t)> & dev,
                                          const std::function<void(uint8_t *, size_t)> & host) const {
    const uint32_t bs     = params.block_size;
    const uint32_t n_used = std::min(nt, n_ring);
    for (size_t ix = 0; ix < layers.size(); ++ix) {
        const layer & l = layers[ix];
        dev(l.k_work, (size_t) n_mem_max*l.k_work->nb[1], (size_t) n_used*l.k_work->nb[1]);
        dev(l.v_work, (size_t) n_mem_max*l.v_work->nb[1], (size_t) n_used*l.v_work->nb[1]);
        if (sinks && l.k_sinks != nullptr) {
            dev(l.k_sinks, 0, ggml_nbytes(l.k_sinks));
            dev(l.v_sinks, 0, ggml_nbytes(l.v_sinks));
        }
        if (ns == 0) {
            continue;
        }
        dev(l.repr, 0, (size_t) ns*l.repr->nb[1]);
        if (resident) {
            dev(l.k_pool, 0, (size_t) ns*bs*k_row_bytes);
            dev(l.v_pool, 0, (size_t) ns*bs*v_row_bytes);
        } else {
            for (uint32_t b = 0; b < ns; ++b) {
                host(store->k((uint32_t) ix, (int32_t) b), bs*k_row_bytes);
            }
            for (uint32_t b = 0; b < ns; ++b) {
                host(store->v((uint32_t) ix, (int32_t) b), bs*v_row_bytes);
            }
        }
    }
}

void llama_kv_cache_infllm::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    GGML_UNUSED(flags);
    if (seq_id > 0) {
        throw std::runtime_error("the InfLLM cache holds sequence 0 only");
    }
    if (xfer) {
        xfer->wait();   // evicted blocks still on their way to the store
    }
    const std::vector<uint32_t> head = state_header();
    io.write(head.data(), head.size()*sizeof(uint32_t));
    const uint32_t counts[3] = {n_tokens, n_stored, (uint32_t) sinks_stored};
    io.write(counts, sizeof(counts));

    state_regions(n_tokens, n_stored, sinks_stored,
                  [&](ggml_tensor * t, size_t off, size_t size) { io.write_tensor(t, off, size); },
                  [&](uint8_t * src, size_t size) { io.write(src, size); });
}

void llama_kv_cache_infllm::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    GGML_UNUSED(flags);
    if (seq_id > 0) {
        throw std::runtime_error("the InfLLM cache holds sequence 0 only");
    }
    const std::vector<uint32_t> want = state_header();
    std::vector<uint32_t> got(want.size());
    io.read(got.data(), got.size()*sizeof(uint32_t));
    static const char * what[] = {"magic", "version", "layers", "n_ctx", "ring cells", "blocks", "block_size",
                                  "n_init", "n_local", "topk", "positions", "K type", "V type", "K row bytes",
                                  "V row bytes"};
    for (size_t i = 0; i < want.size(); ++i) {
        if (got[i] != want[i]) {
            throw std::runtime_error(std::string("the saved InfLLM cache has another ") + what[i] + " (" +
                                     std::to_string(got[i]) + ", this cache: " + std::to_string(want[i]) + ")");
        }
    }
    uint32_t counts[3];
    io.read(counts, sizeof(counts));
    const uint32_t nt = counts[0], ns = counts[1];
    // what ubatches of at most n_ubatch tokens (begin_ubatch) and truncate() leave behind
    const uint32_t ns_hi = nt > 0 ? n_evicted(window_start((llama_pos) nt)) : 0;
    const uint32_t ns_lo = nt > 0 ? n_evicted(window_start(std::max<llama_pos>(0, (llama_pos) nt - (llama_pos) n_ubatch))) : 0;
    const bool sinks = counts[2] != 0;
    if (nt > n_ctx || ns < ns_lo || ns > ns_hi || counts[2] > 1 || (sinks && window_start((llama_pos) nt) == 0)) {
        throw std::runtime_error("the saved InfLLM cache state is inconsistent (" + std::to_string(nt) + " tokens, " +
                                 std::to_string(ns) + " stored blocks)");
    }
    clear(true);
    try {
        if (store && ns > 0) {
            store->reserve(ns);
        }
        state_regions(nt, ns, sinks,
                      [&](ggml_tensor * t, size_t off, size_t size) { io.read_tensor(t, off, size); },
                      [&](uint8_t * dst, size_t size) { io.read(dst, size); });
    } catch (...) {
        clear(true);
        throw;
    }
    n_tokens     = nt;
    n_stored     = ns;
    sinks_stored = sinks;
}

void llama_kv_cache_infllm::get_stats(llama_infllm_stats & s) const {
    int64_t resident_blocks = 0;
    if (resident) {
        resident_blocks = (int64_t) n_stored*(int64_t) layers.size();
    } else {
        for (const auto & st : states) {
            for (const int32_t b : st.slot_blk) {
                resident_blocks += b >= 0;
            }
        }
    }
    s.n_tokens        = n_tokens;
    s.n_blocks        = n_stored;
    s.n_blocks_max    = n_blocks;
    s.selections      = selections;
    s.n_ring          = n_ring;
    s.n_pool          = n_pool;
    s.resident        = resident;
    s.work_bytes      = work_bytes;
    s.pool_bytes      = pool_bytes;
    s.repr_bytes      = repr_bytes;
    s.device_bytes    = ggml_backend_buffer_get_size(buf_device.get());
    s.budget_bytes    = params.budget_bytes;
    s.host_bytes      = store ? store->bytes() : 0;
    s.blocks_resident = resident_blocks;
    s.hits            = blk_hits;
    s.misses          = blk_misses;
    s.ubatches        = n_ubatches;
    s.callbacks       = n_callbacks;
    s.bytes_h2d       = xfer ? xfer->bytes_h2d : 0;
    s.bytes_d2h       = xfer ? xfer->bytes_d2h : 0;
    s.transfer_wait_s = xfer ? xfer->wait_s : 0.0;
    s.host_work_s     = host_work_s;
}

//
// llama_kv_cache_infllm_context
//

llama_kv_cache_infllm_context::llama_kv_cache_infllm_context(llama_memory_status status) : status(status) {
}

llama_kv_cache_infllm_context::llama_kv_cache_infllm_context(llama_kv_cache_infllm * cache) :
    status(LLAMA_MEMORY_STATUS_SUCCESS), cache(cache) {
}

llama_kv_cache_infllm_context::llama_kv_cache_infllm_context(llama_kv_cache_infllm * cache, std::vector<llama_ubatch> ubatches) :
    status(ubatches.empty() ? LLAMA_MEMORY_STATUS_NO_UPDATE : LLAMA_MEMORY_STATUS_SUCCESS),
    cache(cache), ubatches(std::move(ubatches)) {
}

bool llama_kv_cache_infllm_context::next() {
    return ++i_next < ubatches.size();
}

bool llama_kv_cache_infllm_context::apply() {
    if (ubatches.empty()) {
        return true;   // reservation
    }
    const llama_ubatch & ub = ubatches[i_next];
    try {
        cache->begin_ubatch(ub.pos[0], ub.n_tokens);
    } catch (const std::exception & e) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, e.what());
        return false;
    }
    return true;
}

const llama_ubatch & llama_kv_cache_infllm_context::get_ubatch() const {
    static const llama_ubatch empty = {};
    return ubatches.empty() ? empty : ubatches[i_next];
}
