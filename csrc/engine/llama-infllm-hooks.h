#pragma once

// The entry points that patches/ insert into llama.cpp. Each returns nullptr when the
// context does not use the InfLLM cache, so the stock code path runs unchanged.

#include "llama-graph.h"
#include "llama-memory.h"

#include <memory>

struct llama_model;
struct llama_cparams;
class llm_graph_input_attn_infllm;

// llama_model::create_memory
llama_memory_i * llama_infllm_create_memory(const llama_model & model, const llama_memory_params & params,
                                            const llama_cparams & cparams);

// llm_graph_context::build_attn_inp_kv
llm_graph_input_attn_kv * llama_infllm_build_attn_inp(const llm_graph_context & g);

// llm_graph_context::build_attn(llm_graph_input_attn_kv *, ...)
llm_graph_input_attn_infllm * llama_infllm_as_input(llm_graph_input_attn_kv * inp);

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
        int           il);

// llm_graph_context::build_attn_inp_kv_iswa: the input for the sliding-window composition
// (llama-kv-cache-infllm-iswa.h), or nullptr for llama.cpp's own
std::unique_ptr<llm_graph_input_attn_kv_iswa> llama_infllm_make_attn_inp_iswa(const llm_graph_context & g);

// llm_graph_context::build_attn(llm_graph_input_attn_kv_iswa *, ...): the attention of a global
// layer over the InfLLM cache, or nullptr where llama.cpp's code runs (sliding-window layers,
// other caches)
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
        int           il);

// llama_context::graph_max_nodes: the InfLLM attention adds nodes per layer
uint32_t llama_infllm_extra_graph_nodes(const llama_memory_i * memory, uint32_t n_layer);
