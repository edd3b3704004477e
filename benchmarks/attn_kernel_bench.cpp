// Micro-benchmark of the CPU decode kernel (csrc/engine/llama-infllm-attn-cpu.cpp) alone:
// one query token against n_kv cells in each of 30 layers (SmolLM2-135M's shapes: head size
// 64, 3 KV heads, 9 query heads), the first n_valid cells attended. Each layer has its own
// K/V (as in a real step, ~5 MB per layer at 6.4K cells: read from DRAM), or with
// `shared` = 1 all layers read one K/V (it stays in the last-level cache: the compute cost
// alone). Prints ms per 30-layer step and the NMSE against a double-precision reference.
//
//   make kernel-bench && build/bin/attn_kernel_bench [n_kv n_valid threads shared]

#include "llama-infllm-attn-cpu.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

int main(int argc, char ** argv) {
    const int  n_kv    = argc > 1 ? atoi(argv[1]) : 6400;
    const int  n_valid = argc > 2 ? atoi(argv[2]) : 6300;
    const int  n_thr   = argc > 3 ? atoi(argv[3]) : 2;
    const bool shared  = argc > 4 && atoi(argv[4]) != 0;
    const int  n_layer = 30, d = 64, n_kv_head = 3, n_head = 9, reps = 40;
    if (n_kv <= 0 || n_valid <= 0 || n_valid > n_kv || n_thr <= 0) {
        fprintf(stderr, "usage: %s [n_kv n_valid threads shared], 0 < n_valid <= n_kv\n", argv[0]);
        return 2;
    }

    ggml_init_params ip = {(size_t) 1 << 31, nullptr, false};
    ggml_context * ctx = ggml_init(ip);
    std::mt19937 rng(1);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto fill16 = [&](ggml_tensor * t) {
        for (int64_t i = 0; i < ggml_nelements(t); ++i) {
            ((ggml_fp16_t *) t->data)[i] = ggml_fp32_to_fp16(normal(rng));
        }
    };

    ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_kv, 1);
    for (int c = 0; c < n_kv; ++c) {
        ((ggml_fp16_t *) mask->data)[c] = ggml_fp32_to_fp16(c < n_valid ? 0.0f : -INFINITY);
    }
    ggml_cgraph * gf = ggml_new_graph(ctx);
    std::vector<ggml_tensor *> qs, ks, vs, outs;
    for (int l = 0; l < n_layer; ++l) {
        ggml_tensor * q = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d, n_head, 1);
        for (int i = 0; i < d*n_head; ++i) {
            ((float *) q->data)[i] = 2.0f*normal(rng);
        }
        ggml_tensor * k = shared && l > 0 ? ks[0] : ggml_new_tensor_3d(ctx, GGML_TYPE_F16, d, n_kv_head, n_kv);
        ggml_tensor * v = shared && l > 0 ? vs[0] : ggml_new_tensor_3d(ctx, GGML_TYPE_F16, d, n_kv_head, n_kv);
        if (!(shared && l > 0)) {
            fill16(k);
            fill16(v);
        }
        ggml_tensor * o = llama_infllm_attn_one_query_cpu(ctx, q, k, v, nullptr, mask, 0.125f, std::clamp(n_kv/256, 1, 32));
        ggml_build_forward_expand(gf, o);
        qs.push_back(q); ks.push_back(k); vs.push_back(v); outs.push_back(o);
    }
    ggml_graph_compute_with_ctx(ctx, gf, n_thr);

    // reference for the first and the last layer
    double err = 0.0, ref = 0.0;
    for (int l : {0, n_layer - 1}) {
        const float * q = (const float *) qs[l]->data;
        const ggml_fp16_t * k = (const ggml_fp16_t *) ks[l]->data;
        const ggml_fp16_t * v = (const ggml_fp16_t *) vs[l]->data;
        for (int h = 0; h < n_head; ++h) {
            const int kh = h/(n_head/n_kv_head);
            std::vector<double> p(n_valid);
            double mx = -1e300, sum = 0.0;
            for (int c = 0; c < n_valid; ++c) {
                double s = 0.0;
                for (int i = 0; i < d; ++i) {
                    s += q[h*d + i]*0.125*ggml_fp16_to_fp32(k[(c*n_kv_head + kh)*d + i]);
                }
                p[c] = s;
                mx = std::max(mx, s);
            }
            for (double & x : p) {
                x = std::exp(x - mx);
                sum += x;
            }
            for (int i = 0; i < d; ++i) {
                double o = 0.0;
                for (int c = 0; c < n_valid; ++c) {
                    o += p[c]*ggml_fp16_to_fp32(v[(c*n_kv_head + kh)*d + i]);
                }
                o /= sum;
                const double got = ((const float *) outs[l]->data)[h*d + i];
                err += (got - o)*(got - o);
                ref += o*o;
            }
        }
    }

    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) {
        ggml_graph_compute_with_ctx(ctx, gf, n_thr);
    }
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count()/reps;
    const double bytes = (double) n_valid*n_layer*n_kv_head*d*2*2;   // K and V, f16
    printf("n_kv %d, attended %d, threads %d, %s K/V: %.2f ms per %d-layer step (%.1f GB/s of K/V), NMSE %.2e\n",
           n_kv, n_valid, n_thr, shared ? "shared (cached)" : "per-layer", ms, n_layer, bytes/ms/1e6, err/ref);
    ggml_free(ctx);
    return err/ref < 1e-6 ? 0 : 1;
}
