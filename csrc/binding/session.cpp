// A loaded model with one context: tokenize, evaluate, sample and generate.
//
// Every call that can take long releases the GIL; it takes it back only to call a Python
// callback or to check for Ctrl-C: once per generated token or prompt chunk, and every 50 ms
// from llama.cpp's abort callback while a graph runs, which stops the graph between two nodes
// (a long prompt chunk on a slow CPU would otherwise hold Ctrl-C back for seconds).
// Arguments are validated here before they reach llama.cpp, so a bad value raises a
// Python exception instead of tripping a GGML_ASSERT. Defaults and policy (stop strings,
// text decoding, streaming) live in the Python layer.

#include "binding.h"
#include "errors.h"

#include "llama-cpp.h"
#include "llama-ext.h"
#include "llama-infllm.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"
#ifdef PYLLAMA_INF_RPC
#include "ggml-rpc.h"
#endif

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <cstring>
#include <string>
#include <vector>

namespace {

using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t0) {
    return std::chrono::duration<double>(clock_type::now() - t0).count();
}

struct session_params {
    std::string path;
    int32_t  n_gpu_layers = 0;
    int32_t  main_gpu     = 0;
    std::string rpc_servers;      // "host:port,..." (checked and greeted by pyllama_inf._devices)
    uint32_t n_ctx        = 4096;
    uint32_t n_batch      = 2048;
    uint32_t n_ubatch     = 512;
    int32_t  n_threads    = 1;
    int32_t  flash_attn   = -1;   // -1 auto, 0 off, 1 on
    bool     offload_kqv  = true; // stock cache: K/V (and attention) on the layers' device
    std::string type_k    = "f16"; // K/V cache types by ggml name (checked by pyllama_inf._model)
    std::string type_v    = "f16";
    int32_t  swa_full     = -1;   // sliding-window layers: -1 default (stock: full size, InfLLM: the window), 0 the window, 1 full

    // InfLLM cache (kv="infllm")
    bool     infllm       = false;
    llama_infllm_params iparams = llama_infllm_default_params();
};

// a K/V cache type by its ggml name ("f16", "q8_0", ...)
static ggml_type cache_type(const std::string & name, const char * what) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        if (ggml_type_size((ggml_type) t) > 0 && name == ggml_type_name((ggml_type) t)) {
            return (ggml_type) t;
        }
    }
    throw py::value_error(std::string(what) + ": unknown cache type '" + name + "'");
}

struct sampling_params {
    int32_t  max_tokens  = 128;
    float    temperature = 0.8f;
    int32_t  top_k       = 40;
    float    top_p       = 0.95f;
    float    min_p       = 0.05f;
    uint32_t seed        = LLAMA_DEFAULT_SEED;
};

struct generation_output {
    std::vector<llama_token> tokens;
    std::string finish_reason;     // "stop" or "length"
    int32_t n_prompt_tokens = 0;
    int32_t n_decoded       = 0;   // single-token llama_decode calls
    int32_t n_reused        = 0;   // prompt tokens the context already held (not evaluated)
    double  t_prefill_s     = 0.0;
    double  t_decode_s      = 0.0;
};

struct kv_buffer {
    std::string name;
    bool        is_host;
    size_t      bytes;
};

struct kv_info {
    int32_t n_tokens = 0;
    std::vector<kv_buffer> buffers;
    int32_t graphs_reused = 0;   // llama.cpp compute graphs reused since the context was made
    int64_t reused_total = 0;    // prompt tokens taken from the context (prefix reuse)
    int64_t reuse_fallbacks = 0; // calls whose shared prefix the cache could not go back to
    bool infllm = false;
    llama_infllm_stats infllm_stats{};
};

// Takes the GIL, runs fn (which may call into Python), then raises KeyboardInterrupt (or
// whatever a signal handler raised) if a signal arrived.
template <typename F>
void with_gil_and_signals(F && fn) {
    py::gil_scoped_acquire gil;
    fn();
    if (PyErr_CheckSignals() != 0) {
        throw py::error_already_set();
    }
}

class session {
public:
    explicit session(const session_params & params);

    void close() {
        batch_free();
        ctx.reset();
        model.reset();
        if (threadpool != nullptr) {
            threadpool_free(threadpool);
            threadpool = nullptr;
        }
    }

    bool closed() const { return ctx == nullptr; }

    // the devices a model may use, null-terminated: the RPC servers' devices when servers are
    // given, else every GPU device of this build (what llama.cpp picks by itself, without RPC)
    static std::vector<ggml_backend_dev_t> model_devices(const std::string & rpc_servers);

    std::vector<llama_token> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    py::bytes token_piece(llama_token token) const;
    py::bytes detokenize(const std::vector<llama_token> & tokens, bool remove_special) const;

    py::array_t<float> eval(const std::vector<llama_token> & tokens, int32_t last_n, int32_t chunk);

    generation_output generate(const std::vector<llama_token> & prompt, const sampling_params & sp,
                               py::object on_token, py::object on_progress);

    kv_info kv() const;

    int32_t n_vocab()     const { return llama_vocab_n_tokens(vocab()); }
    int32_t n_ctx()       const { return (int32_t) llama_n_ctx(ctx_checked()); }
    int32_t n_ctx_train() const { return llama_model_n_ctx_train(model_checked()); }
    int32_t n_ubatch()    const { return (int32_t) llama_n_ubatch(ctx_checked()); }
    int32_t n_batch()     const { return (int32_t) llama_n_batch(ctx_checked()); }
    std::string desc() const {
        char buf[256];
        llama_model_desc(model_checked(), buf, sizeof(buf));
        return buf;
    }

    // asks a running eval/generate (in another thread) to stop at the next graph node
    void cancel() { cancel_requested.store(true); }

    ~session() { close(); }

private:
    std::atomic<bool> cancel_requested{false};
    clock_type::time_point last_signal_check{};
    std::unique_ptr<py::error_already_set> interrupt;   // raised by a signal handler mid-graph

    static bool abort_check(void * data);
    void begin_call() {
        cancel_requested.store(false);
        interrupt.reset();
        last_signal_check = clock_type::now();
    }

    llama_model_ptr   model;
    llama_context_ptr ctx;
    std::vector<ggml_backend_dev_t> devices;   // the model's devices (null-terminated)
    llama_batch       batch{};
    bool              batch_owned = false;

    // a persistent CPU thread pool, as upstream's tools attach one; without it ggml starts
    // and joins its worker threads for every graph
    ggml_threadpool * threadpool = nullptr;
    decltype(ggml_threadpool_free) * threadpool_free = nullptr;

    void attach_threadpool(int32_t n_threads);

    const llama_model * model_checked() const {
        if (!model) {
            throw pyllama_error("the model is closed");
        }
        return model.get();
    }

    llama_context * ctx_checked() const {
        if (!ctx) {
            throw pyllama_error("the model is closed");
        }
        return ctx.get();
    }

    const llama_vocab * vocab() const { return llama_model_get_vocab(model_checked()); }

    void batch_free() {
        if (batch_owned) {
            llama_batch_free(batch);
            batch_owned = false;
        }
    }

    void check_tokens(const std::vector<llama_token> & tokens) const;

    // evaluates tokens[begin, end) at positions pos0.., logits for those with index >= out_from
    void decode_range(const std::vector<llama_token> & tokens, size_t begin, size_t end, llama_pos pos0, size_t out_from);

    // The tokens the context holds (positions 0..), and what prefix reuse did.
    std::vector<llama_token> held;
    int64_t n_reused_total = 0;   // prompt tokens taken from the context instead of evaluated
    int64_t n_fallbacks    = 0;   // calls that shared a prefix the cache could not go back to
    int32_t n_reused_last  = 0;

    // Makes the context hold the longest prefix of `tokens` (at most max_keep tokens) that it
    // can keep, and returns its length; the caller evaluates the rest. Kept prefixes end on the
    // n_ubatch grid, so that the rest is evaluated in the ubatches of a fresh evaluation; when
    // the cache cannot go back that far (the InfLLM ring or a window-size sliding-window cache
    // overwrote the window) the context starts empty.
    size_t reuse_prefix(const std::vector<llama_token> & tokens, size_t max_keep);

    // drops the context (memory and held tokens)
    void reset_context();

    // Evaluates tokens[begin, n) at positions begin.. (the context holds tokens[0, begin)),
    // logits for those with index >= out_from. Calls llama_decode with up to n_batch tokens
    // that end on the n_ubatch grid (up to n_ubatch when they ask for logits), so llama.cpp's
    // ubatches start where a fresh evaluation's would; chunk > 0 uses calls of `chunk` tokens
    // instead. on_chunk(b, e) follows each call. On an exception the context is dropped.
    template <typename F>
    void evaluate(const std::vector<llama_token> & tokens, size_t begin, size_t out_from, size_t chunk, F && on_chunk);

public:
    void reset() { ctx_checked(); reset_context(); }
    std::vector<llama_token> held_tokens() const { return held; }
    void set_held(const std::vector<llama_token> & tokens) {
        const llama_pos n = llama_memory_seq_pos_max(llama_get_memory(ctx_checked()), 0) + 1;
        if ((llama_pos) tokens.size() != n) {
            throw py::value_error("the context holds " + std::to_string(n) + " tokens, not " + std::to_string(tokens.size()));
        }
        check_tokens(tokens);
        held = tokens;
    }
    int64_t fallbacks() const { return n_fallbacks; }
    void save_state(const std::string & path, const std::string & meta);
    void load_state(const std::string & path);
    std::string apply_chat_template(const std::vector<std::pair<std::string, std::string>> & messages,
                                    bool add_assistant, const std::string & tmpl) const;
};

std::vector<ggml_backend_dev_t> session::model_devices(const std::string & rpc_servers) {
    std::vector<ggml_backend_dev_t> out;
    if (!rpc_servers.empty()) {
#ifdef PYLLAMA_INF_RPC
        size_t start = 0;
        while (start <= rpc_servers.size()) {
            const size_t end = std::min(rpc_servers.find(',', start), rpc_servers.size());
            const std::string endpoint = rpc_servers.substr(start, end - start);
            ggml_backend_reg_t reg = ggml_backend_rpc_add_server(endpoint.c_str());
            if (reg == nullptr) {
                throw py::value_error("the RPC server at " + endpoint + " offers no device");
            }
            for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); ++i) {
                out.push_back(ggml_backend_reg_dev_get(reg, i));
            }
            start = end + 1;
        }
#else
        throw py::value_error("rpc_servers needs a build with llama.cpp's RPC backend (-DGGML_RPC=ON)");
#endif
    } else {
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            const auto type = ggml_backend_dev_type(dev);
            if (type == GGML_BACKEND_DEVICE_TYPE_GPU || type == GGML_BACKEND_DEVICE_TYPE_IGPU) {
                out.push_back(dev);
            }
        }
    }
    out.push_back(nullptr);
    return out;
}

session::session(const session_params & params) {
    if (params.n_ctx == 0 || params.n_batch == 0 || params.n_ubatch == 0 || params.n_threads <= 0) {
        throw py::value_error("n_ctx, n_batch, n_ubatch and n_threads must be positive");
    }
    {
        py::gil_scoped_release nogil;

        llama_model_params mparams = llama_model_default_params();
        mparams.n_gpu_layers = params.n_gpu_layers;
        mparams.main_gpu     = params.main_gpu;
        devices = model_devices(params.rpc_servers);
        if (params.main_gpu < 0 || (params.main_gpu > 0 && (size_t) params.main_gpu >= devices.size() - 1)) {
            throw py::value_error("main_gpu = " + std::to_string(params.main_gpu) + " is not one of the " +
                                  std::to_string(devices.size() - 1) + " devices this model can use");
        }
        mparams.devices = devices.data();
        model.reset(llama_model_load_from_file(params.path.c_str(), mparams));
        if (!model) {
            throw model_load_error("llama.cpp could not load the model from '" + params.path +
                                   "' (see the pyllama_inf log for the reason)");
        }

        llama_context_params cparams = llama_context_default_params();
        cparams.n_ctx           = params.n_ctx;
        cparams.n_batch         = params.n_batch;
        cparams.n_ubatch        = params.n_ubatch;
        cparams.n_seq_max       = 1;
        cparams.n_threads       = params.n_threads;
        cparams.n_threads_batch = params.n_threads;
        cparams.flash_attn_type = (llama_flash_attn_type) params.flash_attn;
        cparams.offload_kqv     = params.offload_kqv;
        cparams.type_k          = cache_type(params.type_k, "type_k");
        cparams.type_v          = cache_type(params.type_v, "type_v");
        cparams.no_perf         = true;
        // the InfLLM cache's sliding-window layers keep just their window unless asked otherwise
        cparams.swa_full        = params.swa_full >= 0 ? params.swa_full == 1 : (params.infllm ? false : cparams.swa_full);
        cparams.abort_callback      = &session::abort_check;
        cparams.abort_callback_data = this;
        if (params.infllm) {
            char err[512] = {0};
            ctx.reset(llama_init_from_model_infllm(model.get(), cparams, &params.iparams, err, sizeof(err)));
            if (!ctx) {
                model.reset();
                const std::string why = err;
                if (why.rfind("InfLLM cache:", 0) == 0) {
                    throw unsupported_error(why);
                }
                if (why.rfind("kv_budget", 0) == 0 || why.rfind("host_budget", 0) == 0 || why.rfind("cache_blocks", 0) == 0) {
                    throw py::value_error(why);
                }
                throw model_load_error("could not create an InfLLM context for '" + params.path + "': " + why);
            }
        } else {
            ctx.reset(llama_init_from_model(model.get(), cparams));
        }
        if (!ctx) {
            model.reset();
            throw model_load_error("llama.cpp could not create a context for '" + params.path +
                                   "' (see the pyllama_inf log for the reason)");
        }
        batch       = llama_batch_init((int32_t) llama_n_batch(ctx.get()), 0, 1);
        batch_owned = true;
        attach_threadpool(params.n_threads);
    }
}

// Called by the CPU backend after each graph node (on the thread that called llama_decode).
bool session::abort_check(void * data) {
    auto * s = static_cast<session *>(data);
    if (s->cancel_requested.load(std::memory_order_relaxed) || s->interrupt) {
        return true;
    }
    const auto now = clock_type::now();
    if (now - s->last_signal_check < std::chrono::milliseconds(50)) {
        return false;
    }
    s->last_signal_check = now;
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {
        s->interrupt = std::make_unique<py::error_already_set>();
        return true;
    }
    return false;
}

void session::attach_threadpool(int32_t n_threads) {
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    ggml_backend_reg_t reg = cpu ? ggml_backend_dev_backend_reg(cpu) : nullptr;
    if (reg == nullptr) {
        return;
    }
    auto * tp_new  = (decltype(ggml_threadpool_new)  *) ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_new");
    auto * tp_free = (decltype(ggml_threadpool_free) *) ggml_backend_reg_get_proc_address(reg, "ggml_threadpool_free");
    if (tp_new == nullptr || tp_free == nullptr) {
        return;
    }
    ggml_threadpool_params tpp = ggml_threadpool_params_default(n_threads);
    threadpool = tp_new(&tpp);
    if (threadpool != nullptr) {
        threadpool_free = tp_free;
        llama_attach_threadpool(ctx.get(), threadpool, nullptr);
    }
}

std::vector<llama_token> session::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    const llama_vocab * v = vocab();
    if (text.size() > (size_t) INT32_MAX / 2) {
        throw py::value_error("text is too long to tokenize");
    }
    std::vector<llama_token> out(text.size() + 2);
    int32_t n = llama_tokenize(v, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), add_special, parse_special);
    if (n < 0) {
        out.resize(-n);
        n = llama_tokenize(v, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), add_special, parse_special);
    }
    if (n < 0) {
        throw pyllama_error("tokenization failed");
    }
    out.resize(n);
    return out;
}

py::bytes session::token_piece(llama_token token) const {
    check_tokens({token});
    char buf[256];
    int32_t n = llama_token_to_piece(vocab(), token, buf, sizeof(buf), 0, false);
    if (n < 0) {
        std::string big(-n, '\0');
        n = llama_token_to_piece(vocab(), token, big.data(), (int32_t) big.size(), 0, false);
        return py::bytes(big.data(), std::max(n, 0));
    }
    return py::bytes(buf, n);
}

py::bytes session::detokenize(const std::vector<llama_token> & tokens, bool remove_special) const {
    check_tokens(tokens);
    std::string out(tokens.size() * 8 + 16, '\0');
    int32_t n = llama_detokenize(vocab(), tokens.data(), (int32_t) tokens.size(), out.data(), (int32_t) out.size(), remove_special, false);
    if (n < 0) {
        out.resize(-n);
        n = llama_detokenize(vocab(), tokens.data(), (int32_t) tokens.size(), out.data(), (int32_t) out.size(), remove_special, false);
    }
    if (n < 0) {
        throw pyllama_error("detokenization failed");
    }
    return py::bytes(out.data(), n);
}

void session::check_tokens(const std::vector<llama_token> & tokens) const {
    const int32_t nv = n_vocab();
    for (size_t i = 0; i < tokens.size(); ++i) {
        if (tokens[i] < 0 || tokens[i] >= nv) {
            throw py::value_error("token " + std::to_string(i) + " has id " + std::to_string(tokens[i]) +
                                  ", outside the vocabulary [0, " + std::to_string(nv) + ")");
        }
    }
}

void session::decode_range(const std::vector<llama_token> & tokens, size_t begin, size_t end, llama_pos pos0, size_t out_from) {
    batch.n_tokens = (int32_t) (end - begin);
    for (size_t i = begin; i < end; ++i) {
        const int32_t j = (int32_t) (i - begin);
        batch.token   [j]    = tokens[i];
        batch.pos     [j]    = pos0 + j;
        batch.n_seq_id[j]    = 1;
        batch.seq_id  [j][0] = 0;
        batch.logits  [j]    = i >= out_from;
    }
    const int32_t rc = llama_decode(ctx.get(), batch);
    if (rc == 2 && interrupt) {   // Ctrl-C (or another signal handler's exception) mid-graph
        py::error_already_set e = std::move(*interrupt);
        interrupt.reset();
        throw e;
    }
    if (rc == 2 && cancel_requested.load()) {
        throw pyllama_error("the generation was cancelled");
    }
    if (rc == 1) {
        throw context_full_error("no room left in the KV cache (n_ctx = " + std::to_string(n_ctx()) + ")");
    }
    if (rc != 0) {
        throw decode_error("llama_decode failed with code " + std::to_string(rc));
    }
}

void session::reset_context() {
    held.clear();
    llama_infllm_keep_prefix(ctx.get(), 0);
}

size_t session::reuse_prefix(const std::vector<llama_token> & tokens, size_t max_keep) {
    size_t p = 0;
    const size_t lim = std::min({held.size(), tokens.size(), max_keep});
    while (p < lim && held[p] == tokens[p]) {
        ++p;
    }
    // the prefix kept ends on the n_ubatch grid: the rest is then evaluated in the ubatches a
    // fresh evaluation uses, and a token's result depends on its ubatch (the InfLLM cache
    // selects blocks per ubatch; ggml picks kernels, and so summation orders, by batch size)
    const size_t grid = (size_t) n_ubatch();
    const size_t keep = p/grid*grid;
    n_reused_last = 0;
    if (keep > 0 && keep == held.size()) {
        n_reused_last = (int32_t) keep;
    } else if (keep > 0 && llama_infllm_keep_prefix(ctx.get(), (llama_pos) keep) == 1) {
        held.resize(keep);
        n_reused_last = (int32_t) keep;
    } else {
        n_fallbacks += keep > 0;   // the Python layer logs it
        reset_context();
    }
    n_reused_total += n_reused_last;
    return (size_t) n_reused_last;
}

template <typename F>
void session::evaluate(const std::vector<llama_token> & tokens, size_t begin, size_t out_from, size_t chunk, F && on_chunk) {
    const size_t n  = tokens.size();
    const size_t nu = (size_t) n_ubatch();
    const size_t nb = std::max(nu, (size_t) n_batch()/nu*nu);
    try {
        for (size_t b = begin; b < n; ) {
            size_t e;
            if (chunk > 0) {
                e = std::min(n, b + chunk);
            } else {
                // llama.cpp cuts a call into ubatches from its start: a call that starts off the
                // grid (chunk > 0 before) ends at the next grid point
                e = std::min(n, b % nu != 0 ? (b/nu + 1)*nu : b + nb);
                const size_t first_out = std::max(b, out_from);
                if (e > first_out + nu) {
                    // at most a ubatch of logit rows per call: llama.cpp keeps one call's rows
                    e = (first_out + nu)/nu*nu;
                }
            }
            decode_range(tokens, b, e, (llama_pos) b, out_from);
            held.insert(held.end(), tokens.begin() + (std::ptrdiff_t) b, tokens.begin() + (std::ptrdiff_t) e);
            on_chunk(b, e);
            b = e;
        }
    } catch (...) {
        reset_context();   // a failed or cancelled llama_decode leaves the cache undefined
        throw;
    }
}

py::array_t<float> session::eval(const std::vector<llama_token> & tokens, int32_t last_n, int32_t chunk) {
    ctx_checked();
    check_tokens(tokens);
    const size_t n = tokens.size();
    if (n == 0) {
        throw py::value_error("tokens must not be empty");
    }
    if (n > (size_t) n_ctx()) {
        throw context_full_error(std::to_string(n) + " tokens do not fit into n_ctx = " + std::to_string(n_ctx()));
    }
    if (last_n <= 0 || (size_t) last_n > n) {
        throw py::value_error("last_n must be in [1, " + std::to_string(n) + "], got " + std::to_string(last_n));
    }
    if (chunk < 0 || chunk > n_ubatch()) {
        throw py::value_error("chunk must be 0 (the default) or in [1, n_ubatch = " + std::to_string(n_ubatch()) + "]");
    }
    const size_t nv       = (size_t) n_vocab();
    const size_t out_from = n - (size_t) last_n;
    begin_call();
    std::vector<float> out((size_t) last_n * nv);
    {
        py::gil_scoped_release nogil;
        // chunk > 0: a fresh evaluation in chunks of that size, off the grid that prefix reuse
        // relies on, so the context is not reused afterwards
        const size_t begin = chunk > 0 ? (reset_context(), 0) : reuse_prefix(tokens, out_from);
        evaluate(tokens, begin, out_from, (size_t) chunk, [&](size_t b, size_t e) {
            for (size_t i = std::max(b, out_from); i < e; ++i) {
                const float * row = llama_get_logits_ith(ctx.get(), (int32_t) (i - b));
                std::memcpy(out.data() + (i - out_from) * nv, row, nv * sizeof(float));
            }
            with_gil_and_signals([] {});
        });
        if (chunk > 0) {
            held.clear();
        }
    }
    py::array_t<float> arr({(py::ssize_t) last_n, (py::ssize_t) nv});
    std::memcpy(arr.mutable_data(), out.data(), out.size() * sizeof(float));
    return arr;
}

llama_token argmax(const float * logits, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; ++i) {
        if (logits[i] > logits[best]) {
            best = i;
        }
    }
    return best;
}

llama_sampler_ptr make_sampler(const sampling_params & sp) {
    llama_sampler_chain_params cp = llama_sampler_chain_default_params();
    cp.no_perf = true;
    llama_sampler_ptr chain(llama_sampler_chain_init(cp));
    if (sp.top_k > 0) {
        llama_sampler_chain_add(chain.get(), llama_sampler_init_top_k(sp.top_k));
    }
    llama_sampler_chain_add(chain.get(), llama_sampler_init_top_p(sp.top_p, 1));
    llama_sampler_chain_add(chain.get(), llama_sampler_init_min_p(sp.min_p, 1));
    llama_sampler_chain_add(chain.get(), llama_sampler_init_temp(sp.temperature));
    llama_sampler_chain_add(chain.get(), llama_sampler_init_dist(sp.seed));
    return chain;
}

generation_output session::generate(const std::vector<llama_token> & prompt, const sampling_params & sp,
                                    py::object on_token, py::object on_progress) {
    ctx_checked();
    check_tokens(prompt);
    if (prompt.empty()) {
        throw py::value_error("the prompt has no tokens");
    }
    if (prompt.size() > (size_t) n_ctx()) {
        throw context_full_error("the prompt has " + std::to_string(prompt.size()) +
                                 " tokens, more than n_ctx = " + std::to_string(n_ctx()));
    }
    if (sp.max_tokens < 0) {
        throw py::value_error("max_tokens must be >= 0");
    }
    // greedy decoding takes the first maximum, as llama.cpp's greedy sampler does, without
    // building a candidate array over the whole vocabulary for every token
    const bool greedy = sp.temperature <= 0.0f;
    llama_sampler_ptr smpl = greedy ? nullptr : make_sampler(sp);
    const llama_vocab * v = vocab();

    begin_call();
    generation_output out;
    out.n_prompt_tokens = (int32_t) prompt.size();
    out.finish_reason   = "length";
    {
        py::gil_scoped_release nogil;

        const auto t0 = clock_type::now();
        // the last prompt token is evaluated again when the context holds all of them: its logits
        // are not kept
        const size_t begin = reuse_prefix(prompt, prompt.size() - 1);
        out.n_reused = (int32_t) begin;
        evaluate(prompt, begin, prompt.size() - 1, 0, [&](size_t, size_t end) {
            with_gil_and_signals([&] {
                if (!on_progress.is_none()) {
                    on_progress(end, prompt.size());
                }
            });
        });
        out.t_prefill_s = seconds_since(t0);

        const auto t1 = clock_type::now();
        llama_pos n_past = (llama_pos) prompt.size();
        std::vector<llama_token> one(1);
        for (int32_t i = 0; i < sp.max_tokens; ++i) {
            const llama_token tok = greedy ? argmax(llama_get_logits_ith(ctx.get(), -1), n_vocab())
                                           : llama_sampler_sample(smpl.get(), ctx.get(), -1);
            if (llama_vocab_is_eog(v, tok)) {
                out.finish_reason = "stop";
                break;
            }
            out.tokens.push_back(tok);
            bool keep_going = true;
            with_gil_and_signals([&] {
                if (!on_token.is_none()) {
                    keep_going = on_token(tok, token_piece(tok)).cast<bool>();
                }
            });
            if (!keep_going) {
                out.finish_reason = "stop";
                break;
            }
            if (i + 1 == sp.max_tokens || n_past >= n_ctx()) {
                break;   // "length": the budget or the context is used up
            }
            one[0] = tok;
            try {
                decode_range(one, 0, 1, n_past, 0);
            } catch (...) {
                reset_context();
                throw;
            }
            held.push_back(tok);
            n_past++;
            out.n_decoded++;
        }
        out.t_decode_s = seconds_since(t1);
    }
    return out;
}

void session::save_state(const std::string & path, const std::string & meta) {
    ctx_checked();
    char err[1024] = {0};
    int32_t rc;
    {
        py::gil_scoped_release nogil;
        rc = llama_infllm_state_save(ctx.get(), path.c_str(), meta.data(), meta.size(), err, sizeof(err));
    }
    if (rc != 0) {
        throw state_error(std::string("could not save the state to '") + path + "': " + err);
    }
}

void session::load_state(const std::string & path) {
    ctx_checked();
    char err[1024] = {0};
    int32_t rc;
    {
        py::gil_scoped_release nogil;
        rc = llama_infllm_state_load(ctx.get(), path.c_str(), err, sizeof(err));
    }
    if (rc == -2) {
        held.clear();   // the memory was cleared
    }
    if (rc != 0) {
        throw state_error(std::string("could not load the state from '") + path + "': " + err +
                          (rc == -2 ? " (the context is now empty)" : " (the context is unchanged)"));
    }
    held.clear();   // the caller sets the tokens the state holds (set_held)
}

std::string session::apply_chat_template(const std::vector<std::pair<std::string, std::string>> & messages,
                                         bool add_assistant, const std::string & tmpl) const {
    std::vector<llama_chat_message> msgs;
    msgs.reserve(messages.size());
    size_t total = 0;
    for (const auto & [role, content] : messages) {
        msgs.push_back({role.c_str(), content.c_str()});
        total += role.size() + content.size();
    }
    const char * t = tmpl.empty() ? nullptr : tmpl.c_str();
    if (t == nullptr) {
        t = llama_model_chat_template(model_checked(), nullptr);
    }
    if (t == nullptr) {
        throw py::value_error("the model has no chat template (tokenizer.chat_template); pass one by name, e.g. 'chatml'");
    }
    std::string out(2*total + 1024, '\0');
    int32_t n = llama_chat_apply_template(t, msgs.data(), msgs.size(), add_assistant, out.data(), (int32_t) out.size());
    if (n > (int32_t) out.size()) {
        out.resize((size_t) n);
        n = llama_chat_apply_template(t, msgs.data(), msgs.size(), add_assistant, out.data(), (int32_t) out.size());
    }
    if (n < 0) {
        throw unsupported_error("llama.cpp does not know this chat template (it recognises the common ones by their "
                                "markers: chatml, llama2/3, gemma, mistral, phi3, ...); pass a known one by name");
    }
    out.resize((size_t) n);
    return out;
}

kv_info session::kv() const {
    llama_context * c = ctx_checked();
    kv_info info;
    info.n_tokens = llama_memory_seq_pos_max(llama_get_memory(c), 0) + 1;
    info.infllm = llama_infllm_get_stats(c, &info.infllm_stats) == 0;
    info.graphs_reused = llama_perf_context(c).n_reused;
    info.reused_total  = n_reused_total;
    info.reuse_fallbacks = n_fallbacks;
    for (const auto & [buft, mb] : llama_get_memory_breakdown(c)) {
        if (mb.context > 0) {
            info.buffers.push_back({ggml_backend_buft_name(buft), ggml_backend_buft_is_host(buft), mb.context});
        }
    }
    return info;
}

} // namespace

void register_session(py::module_ & m) {
    m.def("n_gpu_devices", [] {
        int n = 0;
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            const auto type = ggml_backend_dev_type(ggml_backend_dev_get(i));
            n += type == GGML_BACKEND_DEVICE_TYPE_GPU || type == GGML_BACKEND_DEVICE_TYPE_IGPU;
        }
        return n;
    }, "Number of GPU devices this build of llama.cpp can use (0 on a CPU-only build).");
    m.def("gpu_devices", [] {
        std::vector<std::pair<std::string, std::string>> out;
        for (ggml_backend_dev_t dev : session::model_devices("")) {
            if (dev != nullptr) {
                out.emplace_back(ggml_backend_dev_name(dev), ggml_backend_dev_description(dev));
            }
        }
        return out;
    }, "(name, description) of each GPU device this build can use, in main_gpu order.");
#ifdef PYLLAMA_INF_RPC
    m.attr("RPC_AVAILABLE") = true;
    m.attr("RPC_PROTO_MAJOR_VERSION") = RPC_PROTO_MAJOR_VERSION;
#else
    m.attr("RPC_AVAILABLE") = false;
    m.attr("RPC_PROTO_MAJOR_VERSION") = -1;
#endif

    py::class_<session_params>(m, "SessionParams", "Options for loading a model and creating its context.")
        .def(py::init<>())
        .def_readwrite("path",         &session_params::path)
        .def_readwrite("n_gpu_layers", &session_params::n_gpu_layers)
        .def_readwrite("main_gpu",     &session_params::main_gpu)
        .def_readwrite("rpc_servers",  &session_params::rpc_servers, "host:port,... (checked by pyllama_inf._devices)")
        .def_readwrite("offload_kqv", &session_params::offload_kqv)
        .def_readwrite("type_k",       &session_params::type_k, "K cache type (ggml name)")
        .def_readwrite("type_v",       &session_params::type_v, "V cache type (ggml name)")
        .def_readwrite("n_ctx",        &session_params::n_ctx)
        .def_readwrite("n_batch",      &session_params::n_batch)
        .def_readwrite("n_ubatch",     &session_params::n_ubatch)
        .def_readwrite("n_threads",    &session_params::n_threads)
        .def_readwrite("flash_attn",   &session_params::flash_attn, "-1 auto, 0 off, 1 on")
        .def_readwrite("swa_full",     &session_params::swa_full, "-1 default, 0 window-size SWA cache, 1 full-size")
        .def_readwrite("infllm",       &session_params::infllm, "use the InfLLM cache")
        .def_property("block_size", [](const session_params & p) { return p.iparams.block_size; },
                                    [](session_params & p, uint32_t v) { p.iparams.block_size = v; })
        .def_property("n_init",     [](const session_params & p) { return p.iparams.n_init; },
                                    [](session_params & p, uint32_t v) { p.iparams.n_init = v; })
        .def_property("n_local",    [](const session_params & p) { return p.iparams.n_local; },
                                    [](session_params & p, uint32_t v) { p.iparams.n_local = v; })
        .def_property("topk",       [](const session_params & p) { return p.iparams.topk; },
                                    [](session_params & p, uint32_t v) { p.iparams.topk = v; })
        .def_property("rewind",     [](const session_params & p) { return p.iparams.rewind; },
                                    [](session_params & p, uint32_t v) { p.iparams.rewind = v; })
        .def_property("repr_keys",  [](const session_params & p) { return p.iparams.repr_keys; },
                                    [](session_params & p, uint32_t v) { p.iparams.repr_keys = v; })
        .def_property("absolute",   [](const session_params & p) { return p.iparams.absolute; },
                                    [](session_params & p, bool v) { p.iparams.absolute = v; })
        .def_property("true_below", [](const session_params & p) { return p.iparams.true_below; },
                                    [](session_params & p, uint32_t v) { p.iparams.true_below = v; })
        .def_property("packed",     [](const session_params & p) { return p.iparams.packed; },
                                    [](session_params & p, bool v) { p.iparams.packed = v; })
        .def_property("budget_bytes", [](const session_params & p) { return p.iparams.budget_bytes; },
                                      [](session_params & p, size_t v) { p.iparams.budget_bytes = v; })
        .def_property("cache_blocks", [](const session_params & p) { return p.iparams.cache_blocks; },
                                      [](session_params & p, int32_t v) { p.iparams.cache_blocks = v; })
        .def_property("host_budget",  [](const session_params & p) { return p.iparams.host_budget; },
                                      [](session_params & p, size_t v) { p.iparams.host_budget = v; });

    py::class_<llama_infllm_stats>(m, "InfLLMStats", "Counters of the InfLLM cache.")
        .def_readonly("n_tokens",        &llama_infllm_stats::n_tokens)
        .def_readonly("n_blocks",        &llama_infllm_stats::n_blocks)
        .def_readonly("n_blocks_max",    &llama_infllm_stats::n_blocks_max)
        .def_readonly("selections",      &llama_infllm_stats::selections)
        .def_readonly("n_ring",          &llama_infllm_stats::n_ring)
        .def_readonly("n_pool",          &llama_infllm_stats::n_pool)
        .def_readonly("resident",        &llama_infllm_stats::resident)
        .def_readonly("work_bytes",      &llama_infllm_stats::work_bytes)
        .def_readonly("pool_bytes",      &llama_infllm_stats::pool_bytes)
        .def_readonly("repr_bytes",      &llama_infllm_stats::repr_bytes)
        .def_readonly("device_bytes",    &llama_infllm_stats::device_bytes)
        .def_readonly("budget_bytes",    &llama_infllm_stats::budget_bytes)
        .def_readonly("host_bytes",      &llama_infllm_stats::host_bytes)
        .def_readonly("blocks_resident", &llama_infllm_stats::blocks_resident)
        .def_readonly("hits",            &llama_infllm_stats::hits)
        .def_readonly("misses",          &llama_infllm_stats::misses)
        .def_readonly("ubatches",        &llama_infllm_stats::ubatches)
        .def_readonly("callbacks",       &llama_infllm_stats::callbacks)
        .def_readonly("bytes_h2d",       &llama_infllm_stats::bytes_h2d)
        .def_readonly("bytes_d2h",       &llama_infllm_stats::bytes_d2h)
        .def_readonly("transfer_wait_s", &llama_infllm_stats::transfer_wait_s)
        .def_readonly("host_work_s",     &llama_infllm_stats::host_work_s);

    py::class_<sampling_params>(m, "SamplingParams", "Options for one generation.")
        .def(py::init<>())
        .def_readwrite("max_tokens",  &sampling_params::max_tokens)
        .def_readwrite("temperature", &sampling_params::temperature, "0 means greedy")
        .def_readwrite("top_k",       &sampling_params::top_k)
        .def_readwrite("top_p",       &sampling_params::top_p)
        .def_readwrite("min_p",       &sampling_params::min_p)
        .def_readwrite("seed",        &sampling_params::seed);

    py::class_<generation_output>(m, "GenerationOutput", "Raw result of Session.generate.")
        .def_readonly("tokens",          &generation_output::tokens)
        .def_readonly("finish_reason",   &generation_output::finish_reason)
        .def_readonly("n_prompt_tokens", &generation_output::n_prompt_tokens)
        .def_readonly("n_decoded",       &generation_output::n_decoded)
        .def_readonly("n_reused",        &generation_output::n_reused)
        .def_readonly("t_prefill_s",     &generation_output::t_prefill_s)
        .def_readonly("t_decode_s",      &generation_output::t_decode_s);

    py::class_<kv_buffer>(m, "KVBuffer", "Bytes of KV cache held in one buffer type.")
        .def_readonly("name",    &kv_buffer::name)
        .def_readonly("is_host", &kv_buffer::is_host)
        .def_readonly("bytes",   &kv_buffer::bytes);

    py::class_<kv_info>(m, "KVInfo", "Raw KV cache state.")
        .def_readonly("n_tokens", &kv_info::n_tokens)
        .def_readonly("buffers",  &kv_info::buffers)
        .def_readonly("graphs_reused", &kv_info::graphs_reused)
        .def_readonly("reused_total", &kv_info::reused_total)
        .def_readonly("reuse_fallbacks", &kv_info::reuse_fallbacks)
        .def_property_readonly("infllm", [](const kv_info & k) -> py::object {
            return k.infllm ? py::cast(k.infllm_stats) : py::none();
        }, "InfLLMStats, or None for the stock cache");

    py::class_<session>(m, "Session", "A loaded model with one llama.cpp context.")
        .def(py::init<const session_params &>(), py::arg("params"),
             "Load the model and create its context (releases the GIL).")
        .def("close", &session::close, py::call_guard<py::gil_scoped_release>(),
             "Free the context and the model; safe to call twice.")
        .def_property_readonly("closed", &session::closed)
        .def("tokenize", &session::tokenize, py::arg("text"), py::kw_only(),
             py::arg("add_special"), py::arg("parse_special"),
             "UTF-8 bytes -> token ids.")
        .def("token_piece", &session::token_piece, py::arg("token"),
             "The bytes one token stands for (special tokens render empty).")
        .def("detokenize", &session::detokenize, py::arg("tokens"), py::kw_only(), py::arg("remove_special"),
             "Token ids -> UTF-8 bytes.")
        .def("eval", &session::eval, py::arg("tokens"), py::kw_only(), py::arg("last_n"), py::arg("chunk"),
             "Logits [last_n, n_vocab] of tokens evaluated from an empty context in chunks of `chunk`.")
        .def("generate", &session::generate, py::arg("prompt"), py::kw_only(), py::arg("sampling"),
             py::arg("on_token") = py::none(), py::arg("on_progress") = py::none(),
             "Evaluate the prompt, then sample until EOG, max_tokens, a full context or on_token(token, piece)\n"
             "returning False. on_progress(done, total) follows the prompt evaluation. Releases the GIL.")
        .def("kv", &session::kv, "KV cache token count and bytes per buffer type.")
        .def("reset", &session::reset, "Drop the context (the next call evaluates its prompt from the start).")
        .def_property_readonly("held", &session::held_tokens, "The tokens the context holds.")
        .def_property_readonly("reuse_fallbacks", &session::fallbacks,
                               "Calls whose shared prefix the cache could not go back to.")
        .def("set_held", &session::set_held, py::arg("tokens"), "Declare the tokens a loaded state holds.")
        .def("save_state", &session::save_state, py::arg("path"), py::arg("meta"),
             "Write the context's memory to path after the head bytes `meta` (releases the GIL).")
        .def("load_state", &session::load_state, py::arg("path"),
             "Read a state written by save_state into the memory (releases the GIL).")
        .def("apply_chat_template", &session::apply_chat_template, py::arg("messages"), py::kw_only(),
             py::arg("add_assistant"), py::arg("template"),
             "Format (role, content) messages with llama.cpp's built-in template support.")
        .def("cancel", &session::cancel, py::call_guard<py::gil_scoped_release>(),
             "Ask a running eval/generate (in another thread) to stop at the next graph node.")
        .def_property_readonly("n_vocab",     &session::n_vocab)
        .def_property_readonly("n_ctx",       &session::n_ctx)
        .def_property_readonly("n_ctx_train", &session::n_ctx_train)
        .def_property_readonly("n_batch",     &session::n_batch)
        .def_property_readonly("n_ubatch",    &session::n_ubatch)
        .def_property_readonly("desc",        &session::desc);
}
