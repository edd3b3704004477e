// C API of the InfLLM cache and the memory-creation hook.

#include "llama-infllm.h"
#include "llama-infllm-hooks.h"
#include "llama-kv-cache-infllm.h"
#include "llama-kv-cache-infllm-iswa.h"

#include "llama-context.h"
#include "llama-cparams.h"
#include "llama-impl.h"
#include "llama-model.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>

namespace {

// routes the scheduler's eval callback: the cache's sync nodes to the cache, the rest to a
// callback the caller may have set in llama_context_params
struct infllm_router {
    llama_kv_cache_infllm * cache = nullptr;
    ggml_backend_sched_eval_callback user_cb = nullptr;
    void * user_data = nullptr;
};

// the layer of a node named <prefix><il>, or -1
int infllm_node_layer(const ggml_tensor * t, const char * prefix) {
    const size_t n = std::strlen(prefix);
    return std::strncmp(t->name, prefix, n) == 0 ? std::atoi(t->name + n) : -1;
}

bool infllm_eval_cb(ggml_tensor * t, bool ask, void * user_data) {
    auto * r = (infllm_router *) user_data;
    if (r->cache != nullptr && std::strncmp(t->name, "infllm_", 7) == 0) {
        const int il_evict = infllm_node_layer(t, llama_kv_cache_infllm::EVICT_NODE);
        const int il_sync  = infllm_node_layer(t, llama_kv_cache_infllm::SYNC_NODE);
        if (il_evict >= 0 || il_sync >= 0) {
            if (!ask && il_evict >= 0) {
                r->cache->on_evict(il_evict);
            }
            if (!ask && il_sync >= 0) {
                r->cache->on_sync(il_sync, t);   // the picked block ids
            }
            return true;
        }
    }
    return r->user_cb != nullptr ? r->user_cb(t, ask, r->user_data) : false;
}

// set by llama_init_from_model_infllm for the duration of llama_init_from_model on this thread
struct infllm_pending {
    llama_infllm_params params;
    std::string error;
    infllm_router * router = nullptr;
};

thread_local infllm_pending * g_pending = nullptr;

void infllm_check_supported(const llama_model & model, const llama_memory_params & mparams,
                            const llama_cparams & cparams, const llama_infllm_params & p) {
    const auto & hp = model.hparams;
    auto refuse = [](const std::string & why) { throw std::runtime_error("InfLLM cache: " + why); };

    if (p.cache_blocks < -1 || (p.cache_blocks >= 0 && p.budget_bytes > 0)) {
        refuse("invalid parameters (cache_blocks must be >= 0, or -1 for the default, and is decided by the budget when one is given)");
    }
    if (p.block_size == 0 || p.n_local == 0 || p.rewind > (1u << 30) || p.repr_keys > p.block_size) {
        refuse("invalid parameters (block_size and n_local must be > 0, rewind at most 2^30, repr_keys at most block_size)");
    }
    if (llama_model_is_recurrent(&model) || llama_model_is_hybrid(&model)) {
        refuse("recurrent and hybrid models are not supported");
    }
    if (hp.swa_type != LLAMA_SWA_TYPE_NONE) {
        // sliding-window layers keep a stock SWA cache (llama-kv-cache-infllm-iswa.h)
        if (!hp.is_swa_any()) {
            refuse("the model declares sliding-window attention but no layer uses it");
        }
        if (model.arch == LLM_ARCH_DEEPSEEK4 || model.arch == LLM_ARCH_DOTS3NOTE || model.arch == LLM_ARCH_DFLASH) {
            refuse(std::string(llm_arch_name(model.arch)) + "'s K-only sliding-window attention is not supported");
        }
    }
    if (hp.n_layer_kv_from_start >= 0) {
        refuse("layers that reuse another layer's K/V (Gemma 3n, Gemma 4) are not supported");
    }
    if (hp.is_mla()) {
        refuse("models with multi-head latent attention (MLA) are not supported");
    }
    if (hp.use_alibi) {
        refuse("ALiBi is not supported");
    }
    if (hp.n_pos_per_embd() != 1) {
        refuse("the model must use one position per token (multi-section RoPE is not supported)");
    }
    if (model.arch == LLM_ARCH_GROK) {
        refuse("Grok's tanh logit cap is not supported");
    }
    // RoPE itself (type, frequency factors, YaRN, layers without it) is checked on the graph
    // when it is built (llama-graph-infllm.cpp)
    if (hp.is_n_embd_k_gqa_variable() || hp.is_n_embd_v_gqa_variable()) {
        refuse("layers with different K/V sizes are not supported");
    }
    if (cparams.n_seq_max > 1) {
        refuse("n_seq_max > 1 is not supported (single sequence)");
    }
    if (!cparams.causal_attn) {
        refuse("non-causal attention is not supported");
    }
    // types that ggml's set_rows, get_rows and copies handle on every backend the cache runs on
    auto type_ok = [](ggml_type t) {
        return t == GGML_TYPE_F16 || t == GGML_TYPE_F32 || t == GGML_TYPE_Q8_0 || t == GGML_TYPE_Q4_0;
    };
    for (const auto & [what, t, d] : {std::tuple<const char *, ggml_type, uint32_t>{"K", mparams.type_k, hp.n_embd_head_k()},
                                      {"V", mparams.type_v, hp.n_embd_head_v()}}) {
        if (!type_ok(t)) {
            refuse(std::string(what) + " cache type " + ggml_type_name(t) + " is not supported (f16, f32, q8_0, q4_0 are)");
        }
        if (d % ggml_blck_size(t) != 0) {
            refuse(std::string(what) + " cache type " + ggml_type_name(t) + " packs " + std::to_string(ggml_blck_size(t)) +
                   " values per block, which does not divide a head of " + std::to_string(d));
        }
    }
}

} // namespace

void llama_infllm_note_error(const std::string & msg) {
    if (g_pending != nullptr && g_pending->error.empty()) {
        g_pending->error = msg;
    }
}

llama_memory_i * llama_infllm_create_memory(const llama_model & model, const llama_memory_params & params,
                                            const llama_cparams & cparams) {
    if (g_pending == nullptr) {
        return nullptr;
    }
    try {
        infllm_check_supported(model, params, cparams, g_pending->params);
        llama_memory_i * mem = nullptr;
        if (model.hparams.swa_type != LLAMA_SWA_TYPE_NONE) {
            mem = new llama_kv_cache_infllm_iswa(model, g_pending->params, params.type_k, params.type_v,
                                                 !cparams.flash_attn, cparams.offload_kqv, params.swa_full, cparams.n_ctx_seq,
                                                 cparams.n_ubatch);
        } else {
            mem = new llama_kv_cache_infllm(model, g_pending->params, params.type_k, params.type_v,
                                            cparams.offload_kqv, cparams.n_ctx_seq, cparams.n_ubatch);
        }
        llama_kv_cache_infllm * cache = llama_infllm_cache_of(mem);
        cache->set_router(std::unique_ptr<void, void (*)(void *)>(g_pending->router,
                [](void * p) { delete (infllm_router *) p; }));
        g_pending->router->cache = cache;
        g_pending->router = nullptr;   // owned by the cache now
        return mem;
    } catch (const std::exception & e) {
        g_pending->error = e.what();
        throw;
    }
}

//
// C API
//

llama_infllm_params llama_infllm_default_params(void) {
    llama_infllm_params p;
    p.block_size = 128;
    p.n_init     = 128;
    p.n_local    = 4096;
    p.topk       = 16;
    p.rewind     = 1024;
    p.repr_keys  = 0;
    p.absolute   = false;
    p.true_below = 0;
    p.packed     = false;
    p.budget_bytes = 0;
    p.cache_blocks = -1;
    p.host_budget  = 0;
    return p;
}

llama_context * llama_init_from_model_infllm(llama_model * model, llama_context_params cparams,
                                             const llama_infllm_params * iparams, char * err, size_t err_size) {
    auto fail = [&](const std::string & why) -> llama_context * {
        if (err != nullptr && err_size > 0) {
            std::snprintf(err, err_size, "%s", why.c_str());
        }
        return nullptr;
    };
    if (model == nullptr || iparams == nullptr) {
        return fail("model and params must not be null");
    }
    if (cparams.n_seq_max > 1) {
        return fail("InfLLM cache: n_seq_max > 1 is not supported (single sequence)");
    }
    // the cache places each layer's memory between the selection and the attention, from the
    // scheduler's eval callback
    auto * router = new infllm_router;
    router->user_cb   = cparams.cb_eval;
    router->user_data = cparams.cb_eval_user_data;
    cparams.cb_eval           = infllm_eval_cb;
    cparams.cb_eval_user_data = router;

    infllm_pending pending{*iparams, {}, router};
    g_pending = &pending;
    llama_context * ctx = nullptr;
    try {
        ctx = llama_init_from_model(model, cparams);
    } catch (const std::exception & e) {
        pending.error = e.what();
    }
    g_pending = nullptr;
    delete pending.router;   // not null only when no cache took it
    if (ctx == nullptr) {
        return fail(pending.error.empty() ? "llama.cpp could not create the context (see its log)" : pending.error);
    }
    if (llama_infllm_cache_of(llama_get_memory(ctx)) == nullptr) {
        llama_free(ctx);
        return fail("InfLLM cache: this model does not use a KV cache");
    }
    return ctx;
}

int32_t llama_infllm_get_stats(const llama_context * ctx, llama_infllm_stats * stats) {
    if (ctx == nullptr || stats == nullptr) {
        return -1;
    }
    const llama_kv_cache_infllm * cache = llama_infllm_cache_of(llama_get_memory(ctx));
    if (cache == nullptr) {
        return -1;
    }
    cache->get_stats(*stats);
    return 0;
}

int32_t llama_infllm_keep_prefix(llama_context * ctx, llama_pos n_keep) {
    if (ctx == nullptr || n_keep < 0) {
        return 0;
    }
    llama_memory_t mem = llama_get_memory(ctx);
    if (mem == nullptr) {
        return 0;
    }
    if (n_keep == 0) {
        llama_memory_clear(mem, true);
        return 1;
    }
    llama_synchronize(ctx);
    // the stock SWA cache (alone or beside the InfLLM cache) must still hold the window of a
    // query at n_keep: cells it reused for later positions are gone
    const llama_kv_cache_iswa * iswa = nullptr;
    if (const auto * c = dynamic_cast<const llama_kv_cache_infllm_iswa *>(mem)) {
        iswa = c->get_swa();
    } else {
        iswa = dynamic_cast<const llama_kv_cache_iswa *>(mem);
    }
    if (iswa != nullptr && !llama_infllm_swa_holds_window(*iswa->get_swa(), llama_get_model(ctx)->hparams, n_keep)) {
        return 0;
    }
    return llama_memory_seq_rm(mem, 0, n_keep, -1) ? 1 : 0;
}

bool llama_infllm_swa_holds_window(const llama_kv_cache & kv, const llama_hparams & hp, llama_pos p) {
    // the positions a query at p still sees: a run that ends at p - 1 (standard and chunked SWA)
    llama_pos lo = p;
    while (lo > 0 && !llama_hparams::is_masked_swa(hp.n_swa, hp.swa_type, lo - 1, p)) {
        --lo;
    }
    if (lo == p) {
        return true;
    }
    // seq_pos_get: (position, cell) pairs of the sequence, ordered by position
    const auto & held = kv.get_cells(0).seq_pos_get(0);
    llama_pos next = lo;
    for (auto it = held.lower_bound({lo, 0u}); it != held.end() && it->first < p && next < p; ++it) {
        if (it->first == next) {
            ++next;
        } else if (it->first > next) {
            return false;
        }
    }
    return next == p;
}

uint32_t llama_infllm_extra_graph_nodes(const llama_memory_i * memory, uint32_t n_layer) {
    // about 70 nodes per layer (eviction, ring writes, selection, gathering the memory rows, attention)
    return llama_infllm_cache_of(memory) != nullptr ? 128u*n_layer : 0u;
}
