// Single-query attention for the CPU backend (see llama-infllm-attn-cpu.h).
//
// ggml's CPU flash attention handles one query by walking the cells once per query head,
// converting and accumulating V in f16, one cell at a time. For a decode step over a working set
// of thousands of cells that loop dominates the step. Here the cells are taken in tiles: the
// scores of every query head sharing a KV head come from one pass over the tile's K rows, the
// softmax is rescaled once per tile, and V is accumulated in f32 registers. Work is split into
// chunks of cells, each read in order for all KV heads (the next tile prefetched), so threads
// stay balanced whatever part of the working set is masked; a second op merges the chunks'
// partial sums.

#include "llama-infllm-attn-cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define INFLLM_X86_KERNELS 1
#endif

namespace {

constexpr int TILE     = 32;   // cells per tile
constexpr int MAX_GQA  = 8;    // query heads per KV head handled by the vector path

// scores s[g*TILE + j] = q_g . k(cells[j]) for g < n_gqa
using scores_fn = void (*)(const float * q, int n_gqa, int64_t d, const char * k, size_t stride,
                           const int64_t * cells, int n, float * s);
// acc[g*d + i] += p[g*TILE + j] * v(cells[j])[i]
using accum_fn = void (*)(const float * p, int n_gqa, int64_t d, const char * v, size_t stride,
                          const int64_t * cells, int n, float * acc);

void scores_generic(const float * q, int n_gqa, int64_t d, const char * k, size_t stride,
                    const int64_t * cells, int n, float * s) {
    std::vector<float> row(d);
    for (int j = 0; j < n; ++j) {
        ggml_fp16_to_fp32_row((const ggml_fp16_t *) (k + cells[j]*stride), row.data(), d);
        for (int g = 0; g < n_gqa; ++g) {
            float sum = 0.0f;
            for (int64_t i = 0; i < d; ++i) {
                sum += q[g*d + i]*row[i];
            }
            s[g*TILE + j] = sum;
        }
    }
}

void accum_generic(const float * p, int n_gqa, int64_t d, const char * v, size_t stride,
                   const int64_t * cells, int n, float * acc) {
    std::vector<float> row(d);
    for (int j = 0; j < n; ++j) {
        ggml_fp16_to_fp32_row((const ggml_fp16_t *) (v + cells[j]*stride), row.data(), d);
        for (int g = 0; g < n_gqa; ++g) {
            const float w = p[g*TILE + j];
            for (int64_t i = 0; i < d; ++i) {
                acc[g*d + i] += w*row[i];
            }
        }
    }
}

#ifdef INFLLM_X86_KERNELS
__attribute__((target("avx2,fma,f16c")))
void scores_avx2(const float * q, int n_gqa, int64_t d, const char * k, size_t stride,
                 const int64_t * cells, int n, float * s) {
    for (int j = 0; j < n; ++j) {
        const uint16_t * kr = (const uint16_t *) (k + cells[j]*stride);
        __m256 a[MAX_GQA];
        for (int g = 0; g < n_gqa; ++g) {
            a[g] = _mm256_setzero_ps();
        }
        for (int64_t i = 0; i < d; i += 8) {
            const __m256 kv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (kr + i)));
            for (int g = 0; g < n_gqa; ++g) {
                a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g*d + i), kv, a[g]);
            }
        }
        for (int g = 0; g < n_gqa; ++g) {
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(a[g]), _mm256_extractf128_ps(a[g], 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            s[g*TILE + j] = _mm_cvtss_f32(h);
        }
    }
}

__attribute__((target("avx2,fma,f16c")))
void accum_avx2(const float * p, int n_gqa, int64_t d, const char * v, size_t stride,
                const int64_t * cells, int n, float * acc) {
    for (int64_t i = 0; i < d; i += 8) {
        __m256 a[MAX_GQA];
        for (int g = 0; g < n_gqa; ++g) {
            a[g] = _mm256_loadu_ps(acc + g*d + i);
        }
        for (int j = 0; j < n; ++j) {
            const uint16_t * vr = (const uint16_t *) (v + cells[j]*stride);
            const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (vr + i)));
            for (int g = 0; g < n_gqa; ++g) {
                a[g] = _mm256_fmadd_ps(_mm256_set1_ps(p[g*TILE + j]), vv, a[g]);
            }
        }
        for (int g = 0; g < n_gqa; ++g) {
            _mm256_storeu_ps(acc + g*d + i, a[g]);
        }
    }
}

bool cpu_has_avx2() {
    static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
    return ok;
}
#endif

// the mask is 0 / -inf almost everywhere: skip the conversion for those
inline float mask_value(ggml_fp16_t x) {
    uint16_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    return bits == 0 ? 0.0f : bits == 0xFC00 ? -INFINITY : ggml_fp16_to_fp32(x);
}

struct kernels {
    scores_fn scores;
    accum_fn  accum;
};

kernels pick_kernels(int64_t d_k, int64_t d_v, int n_gqa) {
#ifdef INFLLM_X86_KERNELS
    if (cpu_has_avx2() && d_k % 8 == 0 && d_v % 8 == 0 && n_gqa <= MAX_GQA) {
        return {scores_avx2, accum_avx2};
    }
#endif
    (void) d_k; (void) d_v; (void) n_gqa;
    return {scores_generic, accum_generic};
}

// pull the K and V rows of cells [c0, c1) towards the cache (the next tile, while this one runs)
inline void prefetch_rows(const char * k, size_t k_row, const char * v, size_t v_row, int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
        for (size_t off = 0; off < k_row; off += 64) {
            __builtin_prefetch(k + c*k_row + off);
        }
        for (size_t off = 0; off < v_row; off += 64) {
            __builtin_prefetch(v + c*v_row + off);
        }
    }
}

// dst: F32 [2 + d_v, n_head, n_chunks]: per (query head, chunk) the running max, the sum of
// exponentials and the unnormalised output. src: q (scaled) [d_k, n_head], k, v, mask.
// A work unit is one chunk of cells for every head: the cells' rows are read in order, tile
// after tile, and each tile's rows serve all KV heads while they are in the cache.
void partials_op(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * q    = dst->src[0];
    const ggml_tensor * k    = dst->src[1];
    const ggml_tensor * v    = dst->src[2];
    const ggml_tensor * mask = dst->src[3];

    const int64_t d_k      = k->ne[0];
    const int64_t d_v      = v->ne[0];
    const int64_t n_kv_h   = k->ne[1];
    const int64_t n_kv     = k->ne[2];
    const int64_t n_head   = q->ne[1];
    const int     n_gqa    = (int) (n_head/n_kv_h);
    const int64_t n_chunks = dst->ne[2];
    const kernels kern     = pick_kernels(d_k, d_v, n_gqa);
    const ggml_fp16_t * mrow = (const ggml_fp16_t *) mask->data;
    const char * k0 = (const char *) k->data;
    const char * v0 = (const char *) v->data;
    // bytes from one cell's first head to the next cell's (rows hold every KV head)
    const size_t k_row = k->nb[2];
    const size_t v_row = v->nb[2];

    std::vector<float>   s((size_t) n_gqa*TILE);
    std::vector<float>   acc((size_t) n_head*d_v);
    std::vector<int64_t> cells(TILE);
    std::vector<float>   bias(TILE);
    std::vector<float>   m(n_head), l(n_head);

    for (int64_t ch = ith; ch < n_chunks; ch += nth) {
        const int64_t c0 = ch*n_kv/n_chunks;
        const int64_t c1 = (ch + 1)*n_kv/n_chunks;

        std::fill(m.begin(), m.end(), -INFINITY);
        std::fill(l.begin(), l.end(), 0.0f);
        std::fill(acc.begin(), acc.end(), 0.0f);

        for (int64_t t = c0; t < c1; t += TILE) {
            const int64_t t1 = std::min(t + TILE, c1);
            prefetch_rows(k0, k_row, v0, v_row, t1, std::min(t1 + TILE, c1));
            int n = 0;
            for (int64_t c = t; c < t1; ++c) {
                const float mv = mask_value(mrow[c]);
                if (mv != -INFINITY) {
                    cells[n] = c;
                    bias[n]  = mv;
                    ++n;
                }
            }
            if (n == 0) {
                continue;
            }
            for (int64_t h = 0; h < n_kv_h; ++h) {
                const float * qh = (const float *) ((const char *) q->data + h*n_gqa*q->nb[1]);
                float * acc_h = acc.data() + h*n_gqa*d_v;
                kern.scores(qh, n_gqa, d_k, k0 + h*k->nb[1], k_row, cells.data(), n, s.data());
                for (int g = 0; g < n_gqa; ++g) {
                    const int64_t hq = h*n_gqa + g;
                    float * sg = s.data() + g*TILE;
                    float mt = -INFINITY;
                    for (int j = 0; j < n; ++j) {
                        sg[j] += bias[j];
                        mt = std::max(mt, sg[j]);
                    }
                    if (mt > m[hq]) {
                        const float r = m[hq] == -INFINITY ? 0.0f : expf(m[hq] - mt);
                        l[hq] *= r;
                        for (int64_t i = 0; i < d_v; ++i) {
                            acc_h[g*d_v + i] *= r;
                        }
                        m[hq] = mt;
                    }
                    for (int j = 0; j < n; ++j) {
                        sg[j] = expf(sg[j] - m[hq]);
                        l[hq] += sg[j];
                    }
                }
                kern.accum(s.data(), n_gqa, d_v, v0 + h*v->nb[1], v_row, cells.data(), n, acc_h);
            }
        }
        for (int64_t hq = 0; hq < n_head; ++hq) {
            float * out = (float *) ((char *) dst->data + hq*dst->nb[1] + ch*dst->nb[2]);
            out[0] = m[hq];
            out[1] = l[hq];
            std::memcpy(out + 2, acc.data() + hq*d_v, d_v*sizeof(float));
        }
    }
}

// dst: F32 [d_v*n_head, 1], the merged chunks of src[0] (partials_op's output)
void merge_op(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * part = dst->src[0];
    const int64_t d_v      = part->ne[0] - 2;
    const int64_t n_head   = part->ne[1];
    const int64_t n_chunks = part->ne[2];
    for (int64_t h = ith; h < n_head; h += nth) {
        float * out = (float *) dst->data + h*d_v;
        float mx = -INFINITY;
        for (int64_t c = 0; c < n_chunks; ++c) {
            mx = std::max(mx, ((const float *) ((const char *) part->data + h*part->nb[1] + c*part->nb[2]))[0]);
        }
        std::fill(out, out + d_v, 0.0f);
        if (mx == -INFINITY) {
            continue;   // nothing attended
        }
        float sum = 0.0f;
        for (int64_t c = 0; c < n_chunks; ++c) {
            const float * pc = (const float *) ((const char *) part->data + h*part->nb[1] + c*part->nb[2]);
            if (pc[0] == -INFINITY) {
                continue;
            }
            const float w = expf(pc[0] - mx);
            sum += w*pc[1];
            for (int64_t i = 0; i < d_v; ++i) {
                out[i] += w*pc[2 + i];
            }
        }
        for (int64_t i = 0; i < d_v; ++i) {
            out[i] /= sum;
        }
    }
}

} // namespace

bool llama_infllm_attn_cpu_vectorized() {
#ifdef INFLLM_X86_KERNELS
    return cpu_has_avx2();
#else
    return false;
#endif
}

ggml_tensor * llama_infllm_attn_one_query_cpu(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                                              ggml_tensor * mask, float kq_scale, int n_chunks) {
    GGML_ASSERT(q->type == GGML_TYPE_F32 && q->ne[2] == 1 && ggml_is_contiguous(q));
    GGML_ASSERT(k->type == GGML_TYPE_F16 && v->type == GGML_TYPE_F16 && mask->type == GGML_TYPE_F16);
    GGML_ASSERT(k->ne[0] == q->ne[0] && q->ne[1] % k->ne[1] == 0 && v->ne[1] == k->ne[1]);
    GGML_ASSERT(k->ne[2] == v->ne[2] && mask->ne[0] == k->ne[2]);
    GGML_ASSERT(k->nb[0] == ggml_type_size(k->type) && v->nb[0] == ggml_type_size(v->type));

    ggml_tensor * qs = ggml_scale(ctx, q, kq_scale);
    ggml_tensor * args[] = {qs, k, v, mask};
    ggml_tensor * part = ggml_custom_4d(ctx, GGML_TYPE_F32, v->ne[0] + 2, q->ne[1], n_chunks, 1, args, 4,
                                        partials_op, GGML_N_TASKS_MAX, nullptr);
    ggml_tensor * margs[] = {part};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, v->ne[0]*q->ne[1], 1, 1, 1, margs, 1, merge_op, GGML_N_TASKS_MAX, nullptr);
}
