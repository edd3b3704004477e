// Single-query attention for the CPU backend (see llama-infllm-attn-cpu.h).
//
// ggml's CPU flash attention handles one query by walking the cells once per query head,
// converting and accumulating V in f16, one cell at a time. For a decode step over a working set
// of thousands of cells that loop dominates the step. Here the cells are taken in tiles: the
// scores of every query head sharing a KV head come from one pass over the tile's K rows, the
// softmax is rescaled once per tile (vector exp), and V is accumulated in f32 registers.
//
// The step reads ~5 MB of K/V per layer that no cache holds, so the order of reads matters as
// much as the arithmetic: each thread takes a contiguous run of cells, the kernels walk a few
// cells at a time through every KV head of those cells (rows are read front to back, not once
// per head), and rows are prefetched several tiles ahead. Each chunk of cells leaves a partial
// softmax sum per head; a second op merges them. Chunks, not threads, define the partial sums,
// so results do not depend on the thread count.

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

constexpr int TILE           = 32;  // cells per tile
constexpr int PREFETCH_TILES = 8;   // how far ahead the rows are prefetched (measured best of 1-16)

// the K or V rows of a tile's cells: one row per cell holds every KV head's d values
struct rows {
    const char * data;
    size_t       row;        // bytes from one cell to the next
    size_t       head;       // bytes from one KV head to the next within a row
    int64_t      n_kv_head;
    int          n_gqa;      // query heads per KV head
    int64_t      d;
    ggml_type    type;       // F16 or Q8_0, or F32 (keys turned to their positions, see turn_fn)
};

// q8_0 as ggml stores it: 32 values per block, an f16 scale then 32 int8
constexpr int    Q8_BLOCK = 32;
constexpr size_t Q8_BYTES = sizeof(ggml_fp16_t) + Q8_BLOCK;

inline float q8_scale(const char * block) {
    ggml_fp16_t d;
    std::memcpy(&d, block, sizeof(d));
    return ggml_fp16_to_fp32(d);
}

// one head's d values of a row, as f32
inline void row_to_f32(const rows & r, const char * src, float * out) {
    if (r.type == GGML_TYPE_F32) {
        std::memcpy(out, src, r.d*sizeof(float));
        return;
    }
    if (r.type == GGML_TYPE_F16) {
        ggml_fp16_to_fp32_row((const ggml_fp16_t *) src, out, r.d);
        return;
    }
    for (int64_t b = 0; b < r.d/Q8_BLOCK; ++b, src += Q8_BYTES) {
        const float dq = q8_scale(src);
        const int8_t * qs = (const int8_t *) (src + sizeof(ggml_fp16_t));
        for (int i = 0; i < Q8_BLOCK; ++i) {
            out[b*Q8_BLOCK + i] = dq*qs[i];
        }
    }
}

// s[hq*TILE + j] = q_hq . k_{hq/n_gqa}(cells[j]) for every query head hq (q: [d, n_head] contiguous)
using scores_fn = void (*)(const float * q, const rows & k, const int64_t * cells, int n, float * s);
// acc[hq*d + i] += p[hq*TILE + j] * v_{hq/n_gqa}(cells[j])[i]
using accum_fn = void (*)(const float * p, const rows & v, const int64_t * cells, int n, float * acc);
// y = one head's d values of a key row (src), as f32, turned by the rotation whose cosines and
// sines RoPE put in t (RoPE of the unit pattern, see llama_infllm_attn_rot_unit); dimensions
// from n_dims on are not rotated
using turn_fn = void (*)(const rows & k, const char * src, const float * t, float * y, int n_dims, bool neox);

// y turned in place (see turn_fn)
void rotate_generic(float * y, const float * t, int n_dims, bool neox) {
    const int h = n_dims/2;
    for (int j = 0; j < h; ++j) {
        // NEOX pairs (j, j + h), the cosine at j and the sine at j + h; else (2j, 2j + 1)
        const int a = neox ? j : 2*j;
        const int b = neox ? j + h : 2*j + 1;
        const float c = t[a], sn = t[b], xa = y[a], xb = y[b];
        y[a] = xa*c - xb*sn;
        y[b] = xa*sn + xb*c;
    }
}

void turn_generic(const rows & k, const char * src, const float * t, float * y, int n_dims, bool neox) {
    row_to_f32(k, src, y);
    rotate_generic(y, t, n_dims, neox);
}

void scores_generic(const float * q, const rows & k, const int64_t * cells, int n, float * s) {
    std::vector<float> row(k.d);
    for (int j = 0; j < n; ++j) {
        for (int64_t h = 0; h < k.n_kv_head; ++h) {
            row_to_f32(k, k.data + cells[j]*k.row + h*k.head, row.data());
            for (int64_t hq = h*k.n_gqa; hq < (h + 1)*k.n_gqa; ++hq) {
                float sum = 0.0f;
                for (int64_t i = 0; i < k.d; ++i) {
                    sum += q[hq*k.d + i]*row[i];
                }
                s[hq*TILE + j] = sum;
            }
        }
    }
}

void accum_generic(const float * p, const rows & v, const int64_t * cells, int n, float * acc) {
    std::vector<float> row(v.d);
    for (int j = 0; j < n; ++j) {
        for (int64_t h = 0; h < v.n_kv_head; ++h) {
            row_to_f32(v, v.data + cells[j]*v.row + h*v.head, row.data());
            for (int64_t hq = h*v.n_gqa; hq < (h + 1)*v.n_gqa; ++hq) {
                const float w = p[hq*TILE + j];
                for (int64_t i = 0; i < v.d; ++i) {
                    acc[hq*v.d + i] += w*row[i];
                }
            }
        }
    }
}

#ifdef INFLLM_X86_KERNELS
#define INFLLM_AVX2 __attribute__((target("avx2,fma,f16c")))

// Every loop below keeps at most a dozen independent accumulators in flight, so the FMAs run at
// throughput instead of waiting on each other's latency (a single dot product of 64 f16 values
// is a chain of 8 dependent FMAs).

// sum of the 8 lanes of each of v[0..7], as the 8 lanes of the result
INFLLM_AVX2 inline __m256 hsum8(const __m256 * v) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

INFLLM_AVX2 inline __m128 hsum4(const __m256 * v) {
    const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    return _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
}

INFLLM_AVX2 inline float hsum1(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

// out[i] = the lane sum of v[i], i < N
template <int N>
INFLLM_AVX2 inline void hsum_n(const __m256 * v, float * out) {
    int i = 0;
    for (; i + 8 <= N; i += 8) {
        _mm256_storeu_ps(out + i, hsum8(v + i));
    }
    for (; i + 4 <= N; i += 4) {
        _mm_storeu_ps(out + i, hsum4(v + i));
    }
    for (; i < N; ++i) {
        out[i] = hsum1(v[i]);
    }
}

// s[g*TILE + c] = the lane sum of accumulator a[c*G + g]
template <int G, int CB>
INFLLM_AVX2 inline void store_scores(const __m256 * a, float * s) {
    float r[G*CB];
    hsum_n<G*CB>(a, r);
    for (int c = 0; c < CB; ++c) {
        for (int g = 0; g < G; ++g) {
            s[g*TILE + c] = r[c*G + g];
        }
    }
}

// 8 values of an f16 or f32 row as f32 lanes
INFLLM_AVX2 inline __m256 load8(const uint16_t * x) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) x)); }
INFLLM_AVX2 inline __m256 load8(const float * x) { return _mm256_loadu_ps(x); }

// scores of CB cells at a time for the G query heads of one KV head: G*CB accumulators; rows of
// T: uint16_t (f16) or float (keys turned to their positions in a tile buffer)
template <int G, int CB, typename T>
INFLLM_AVX2 inline void scores_block(const float * q, int64_t d, const char * k, size_t stride,
                                     const int64_t * cells, float * s) {
    __m256 a[G*CB] = {};
    const T * kr[CB];
    for (int c = 0; c < CB; ++c) {
        kr[c] = (const T *) (k + cells[c]*stride);
    }
    for (int64_t i = 0; i < d; i += 8) {
        __m256 kv[CB];
        for (int c = 0; c < CB; ++c) {
            kv[c] = load8(kr[c] + i);
        }
        for (int g = 0; g < G; ++g) {
            const __m256 qv = _mm256_loadu_ps(q + g*d + i);
            for (int c = 0; c < CB; ++c) {
                a[c*G + g] = _mm256_fmadd_ps(qv, kv[c], a[c*G + g]);
            }
        }
    }
    store_scores<G, CB>(a, s);
}

// turn_generic with f16 rows converted and pairs rotated 8 lanes at a time, where the layout allows
INFLLM_AVX2 void turn_avx2(const rows & k, const char * src, const float * t, float * y, int n_dims, bool neox) {
    if (k.type == GGML_TYPE_F16) {
        for (int64_t i = 0; i < k.d; i += 8) {   // d % 8 == 0 (pick_kernels)
            _mm256_storeu_ps(y + i, load8((const uint16_t *) src + i));
        }
    } else {
        row_to_f32(k, src, y);
    }
    const int h = n_dims/2;
    if (neox ? h % 8 != 0 : n_dims % 8 != 0) {
        rotate_generic(y, t, n_dims, neox);
    } else if (neox) {
        for (int j = 0; j < h; j += 8) {
            const __m256 a = _mm256_loadu_ps(y + j), b = _mm256_loadu_ps(y + h + j);
            const __m256 c = _mm256_loadu_ps(t + j), sn = _mm256_loadu_ps(t + h + j);
            _mm256_storeu_ps(y + j,     _mm256_fmsub_ps(a, c, _mm256_mul_ps(b, sn)));
            _mm256_storeu_ps(y + h + j, _mm256_fmadd_ps(a, sn, _mm256_mul_ps(b, c)));
        }
    } else {
        // lanes (x0, x1, ..): y0 = x0 c - x1 s, y1 = x1 c + x0 s
        for (int i = 0; i < n_dims; i += 8) {
            const __m256 xv = _mm256_loadu_ps(y + i), tv = _mm256_loadu_ps(t + i);
            const __m256 c  = _mm256_moveldup_ps(tv);                  // c0 c0 c1 c1 ..
            const __m256 sn = _mm256_movehdup_ps(tv);                  // s0 s0 s1 s1 ..
            const __m256 xs = _mm256_permute_ps(xv, 0xB1);             // x1 x0 x3 x2 ..
            _mm256_storeu_ps(y + i, _mm256_fmaddsub_ps(xv, c, _mm256_mul_ps(xs, sn)));
        }
    }
}

enum row_kind { ROW_F16, ROW_Q8, ROW_F32 };

// the scores of CB cells of one KV head's G query heads from f16, q8_0 or f32 rows
template <int G, int CB, row_kind KIND>
INFLLM_AVX2 inline void scores_cells(const float * q, int64_t d, const char * k, size_t stride,
                                     const int64_t * cells, float * s);

// CB cells at a time, every KV head of those cells before the next CB: the rows are read in order
template <int G, row_kind KIND>
INFLLM_AVX2 void scores_avx2(const float * q, const rows & k, const int64_t * cells, int n, float * s) {
    constexpr int CB = std::min(8, 12/G);   // G <= 8, so CB >= 1
    int j = 0;
    for (; j + CB <= n; j += CB) {
        for (int64_t h = 0; h < k.n_kv_head; ++h) {
            scores_cells<G, CB, KIND>(q + h*G*k.d, k.d, k.data + h*k.head, k.row, cells + j, s + h*G*TILE + j);
        }
    }
    for (; j < n; ++j) {
        for (int64_t h = 0; h < k.n_kv_head; ++h) {
            scores_cells<G, 1, KIND>(q + h*G*k.d, k.d, k.data + h*k.head, k.row, cells + j, s + h*G*TILE + j);
        }
    }
}

// acc[g*d + i] += p[g*TILE + j] * v(cells[j])[i] for the G query heads of one KV head, j < n:
// SG 8-wide slices of d for all G heads at a time (G*SG accumulators)
template <int G, int SG>
INFLLM_AVX2 inline void accum_head(const float * p, int64_t d, const char * v, size_t stride,
                                   const int64_t * cells, int n, float * acc) {
    for (int64_t i0 = 0; i0 < d; i0 += 8*SG) {
        __m256 a[G*SG];
        for (int g = 0; g < G; ++g) {
            for (int t = 0; t < SG; ++t) {
                a[g*SG + t] = _mm256_loadu_ps(acc + g*d + i0 + 8*t);
            }
        }
        for (int j = 0; j < n; ++j) {
            const uint16_t * vr = (const uint16_t *) (v + cells[j]*stride) + i0;
            __m256 vv[SG];
            for (int t = 0; t < SG; ++t) {
                vv[t] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (vr + 8*t)));
            }
            for (int g = 0; g < G; ++g) {
                const __m256 w = _mm256_broadcast_ss(p + g*TILE + j);
                for (int t = 0; t < SG; ++t) {
                    a[g*SG + t] = _mm256_fmadd_ps(w, vv[t], a[g*SG + t]);
                }
            }
        }
        for (int g = 0; g < G; ++g) {
            for (int t = 0; t < SG; ++t) {
                _mm256_storeu_ps(acc + g*d + i0 + 8*t, a[g*SG + t]);
            }
        }
    }
}

// accumulation of n cells of one KV head into its G query heads, f16 or (Q8) q8_0 rows
template <int G, int SG, bool Q8>
INFLLM_AVX2 inline void accum_cells(const float * p, int64_t d, const char * v, size_t stride,
                                    const int64_t * cells, int n, float * acc);

// runs of 8 cells, every KV head of a run before the next: the rows are read in order
template <int G, int SG, bool Q8>
INFLLM_AVX2 void accum_avx2(const float * p, const rows & v, const int64_t * cells, int n, float * acc) {
    constexpr int RUN = 8;
    for (int j = 0; j < n; j += RUN) {
        const int nr = std::min(RUN, n - j);
        for (int64_t h = 0; h < v.n_kv_head; ++h) {
            accum_cells<G, SG, Q8>(p + h*G*TILE + j, v.d, v.data + h*v.head, v.row, cells + j, nr, acc + h*G*v.d);
        }
    }
}

// 8 int8 values as f32 lanes
INFLLM_AVX2 inline __m256 q8_lanes(const int8_t * qs) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *) qs)));
}

// scores_block for q8_0 rows: each 32-value block's int8 are scaled by the block's f16 scale
template <int G, int CB>
INFLLM_AVX2 inline void scores_block_q8(const float * q, int64_t d, const char * k, size_t stride,
                                        const int64_t * cells, float * s) {
    __m256 a[G*CB] = {};
    const char * kr[CB];
    for (int c = 0; c < CB; ++c) {
        kr[c] = k + cells[c]*stride;
    }
    for (int64_t b = 0; b < d/Q8_BLOCK; ++b) {
        __m256 dv[CB];
        for (int c = 0; c < CB; ++c) {
            dv[c] = _mm256_set1_ps(q8_scale(kr[c] + b*Q8_BYTES));
        }
        for (int i = 0; i < Q8_BLOCK; i += 8) {
            __m256 kv[CB];
            for (int c = 0; c < CB; ++c) {
                kv[c] = _mm256_mul_ps(dv[c], q8_lanes((const int8_t *) (kr[c] + b*Q8_BYTES + sizeof(ggml_fp16_t)) + i));
            }
            for (int g = 0; g < G; ++g) {
                const __m256 qv = _mm256_loadu_ps(q + g*d + b*Q8_BLOCK + i);
                for (int c = 0; c < CB; ++c) {
                    a[c*G + g] = _mm256_fmadd_ps(qv, kv[c], a[c*G + g]);
                }
            }
        }
    }
    store_scores<G, CB>(a, s);
}

// accum_head for q8_0 rows: one 32-value block (4 slices of 8) for all G heads at a time
template <int G>
INFLLM_AVX2 inline void accum_head_q8(const float * p, int64_t d, const char * v, size_t stride,
                                      const int64_t * cells, int n, float * acc) {
    for (int64_t b = 0; b < d/Q8_BLOCK; ++b) {
        __m256 a[G*4];
        for (int g = 0; g < G; ++g) {
            for (int t = 0; t < 4; ++t) {
                a[g*4 + t] = _mm256_loadu_ps(acc + g*d + b*Q8_BLOCK + 8*t);
            }
        }
        for (int j = 0; j < n; ++j) {
            const char * blk = v + cells[j]*stride + b*Q8_BYTES;
            const float dq = q8_scale(blk);
            const int8_t * qs = (const int8_t *) (blk + sizeof(ggml_fp16_t));
            __m256 vv[4];
            for (int t = 0; t < 4; ++t) {
                vv[t] = q8_lanes(qs + 8*t);
            }
            for (int g = 0; g < G; ++g) {
                const __m256 w = _mm256_set1_ps(p[g*TILE + j]*dq);
                for (int t = 0; t < 4; ++t) {
                    a[g*4 + t] = _mm256_fmadd_ps(w, vv[t], a[g*4 + t]);
                }
            }
        }
        for (int g = 0; g < G; ++g) {
            for (int t = 0; t < 4; ++t) {
                _mm256_storeu_ps(acc + g*d + b*Q8_BLOCK + 8*t, a[g*4 + t]);
            }
        }
    }
}

template <int G, int CB, row_kind KIND>
INFLLM_AVX2 inline void scores_cells(const float * q, int64_t d, const char * k, size_t stride,
                                     const int64_t * cells, float * s) {
    if constexpr (KIND == ROW_Q8) {
        scores_block_q8<G, CB>(q, d, k, stride, cells, s);
    } else if constexpr (KIND == ROW_F32) {
        scores_block<G, CB, float>(q, d, k, stride, cells, s);
    } else {
        scores_block<G, CB, uint16_t>(q, d, k, stride, cells, s);
    }
}

template <int G, int SG, bool Q8>
INFLLM_AVX2 inline void accum_cells(const float * p, int64_t d, const char * v, size_t stride,
                                    const int64_t * cells, int n, float * acc) {
    if constexpr (Q8) {
        accum_head_q8<G>(p, d, v, stride, cells, n, acc);   // whole 32-value blocks: SG does not apply
    } else {
        accum_head<G, SG>(p, d, v, stride, cells, n, acc);
    }
}

// e^x for x <= 0 (x = -inf gives 0 up to 1e-38): 2^n * p(r), x = n ln2 + r, |r| <= ln2/2,
// p the degree-6 Taylor polynomial (relative error ~1e-7)
INFLLM_AVX2 inline __m256 exp_nonpos(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 p = _mm256_set1_ps(1.0f/720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f/120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f/24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f/6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// all-ones in lanes [0, n), zeros in the rest
INFLLM_AVX2 inline __m256 first_lanes(int n) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
}

// one tile of one head's online softmax: s[j] += bias[j]; m = max(m, max s); s[j] = e^(s[j] - m)
// (0 past n); l = l*r + sum s. Returns r = e^(m_old - m_new), the factor for the accumulator.
INFLLM_AVX2 float softmax_tile_avx2(float * s, const float * bias, int n, float & m, float & l) {
    const int nv = (n + 7)/8;
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int t = 0; t < nv; ++t) {
        __m256 x = _mm256_add_ps(_mm256_loadu_ps(s + 8*t), _mm256_loadu_ps(bias + 8*t));
        if (8*t + 8 > n) {   // lanes past n take no part
            const __m256 keep = first_lanes(n - 8*t);
            x = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), x, keep);
        }
        _mm256_storeu_ps(s + 8*t, x);
        mx = _mm256_max_ps(mx, x);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float mt = _mm_cvtss_f32(h);
    float r = 1.0f;
    if (mt > m) {
        r = m == -INFINITY ? 0.0f : expf(m - mt);
        m = mt;
    }
    const __m256 mv = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (int t = 0; t < nv; ++t) {
        __m256 e = exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + 8*t), mv));
        if (8*t + 8 > n) {
            const __m256 keep = first_lanes(n - 8*t);
            e = _mm256_and_ps(e, keep);
        }
        _mm256_storeu_ps(s + 8*t, e);
        sum = _mm256_add_ps(sum, e);
    }
    l = l*r + hsum1(sum);
    return r;
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

// the scalar path's online-softmax step for one tile of one head (see softmax_tile_avx2)
float softmax_tile_generic(float * s, const float * bias, int n, float & m, float & l) {
    float mt = -INFINITY;
    for (int j = 0; j < n; ++j) {
        s[j] += bias[j];
        mt = std::max(mt, s[j]);
    }
    float r = 1.0f;
    if (mt > m) {
        r = m == -INFINITY ? 0.0f : expf(m - mt);
        m = mt;
    }
    float sum = 0.0f;
    for (int j = 0; j < n; ++j) {
        s[j] = expf(s[j] - m);
        sum += s[j];
    }
    l = l*r + sum;
    return r;
}

using softmax_fn = float (*)(float * s, const float * bias, int n, float & m, float & l);

struct kernels {
    scores_fn  scores;      // F16 rows
    accum_fn   accum;
    softmax_fn softmax;
    scores_fn  scores_q8;   // Q8_0 rows
    accum_fn   accum_q8;
    scores_fn  scores_f32;  // F32 rows (keys at their own positions)
    turn_fn    turn;

    void score(const float * q, const rows & k, const int64_t * cells, int n, float * s) const {
        (k.type == GGML_TYPE_Q8_0 ? scores_q8 : k.type == GGML_TYPE_F32 ? scores_f32 : scores)(q, k, cells, n, s);
    }
    void accumulate(const float * p, const rows & v, const int64_t * cells, int n, float * acc) const {
        (v.type == GGML_TYPE_Q8_0 ? accum_q8 : accum)(p, v, cells, n, acc);
    }
};

#ifdef INFLLM_X86_KERNELS
// the accumulator uses SG slices of 8 values per head: as many as fit a dozen registers, dividing d_v
template <int G>
kernels avx2_kernels(int64_t d_v) {
    constexpr int SG = G == 1 ? 8 : G <= 3 ? 4 : G <= 6 ? 2 : 1;
    if (d_v % (8*SG) == 0) {
        return {scores_avx2<G, ROW_F16>, accum_avx2<G, SG, false>, softmax_tile_avx2, scores_avx2<G, ROW_Q8>,
                accum_avx2<G, SG, true>, scores_avx2<G, ROW_F32>, turn_avx2};
    }
    return {scores_avx2<G, ROW_F16>, accum_avx2<G, 1, false>, softmax_tile_avx2, scores_avx2<G, ROW_Q8>,
            accum_avx2<G, 1, true>, scores_avx2<G, ROW_F32>, turn_avx2};
}
#endif

kernels pick_kernels(int64_t d_k, int64_t d_v, int n_gqa) {
#ifdef INFLLM_X86_KERNELS
    if (cpu_has_avx2() && d_k % 8 == 0 && d_v % 8 == 0) {
        switch (n_gqa) {
            case 1: return avx2_kernels<1>(d_v);
            case 2: return avx2_kernels<2>(d_v);
            case 3: return avx2_kernels<3>(d_v);
            case 4: return avx2_kernels<4>(d_v);
            case 5: return avx2_kernels<5>(d_v);
            case 6: return avx2_kernels<6>(d_v);
            case 7: return avx2_kernels<7>(d_v);
            case 8: return avx2_kernels<8>(d_v);
            default: break;
        }
    }
#endif
    (void) d_k; (void) d_v; (void) n_gqa;
    return {scores_generic, accum_generic, softmax_tile_generic, scores_generic, accum_generic, scores_generic,
            turn_generic};
}

// pull the K and V rows of cells [c0, c1) towards the cache (PREFETCH_TILES ahead of the running tile),
// into the outer levels: they are used once, a few tiles later
inline void prefetch_rows(const rows & k, const rows & v, int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
        for (size_t off = 0; off < k.row; off += 64) {
            __builtin_prefetch(k.data + c*k.row + off, 0, 1);
        }
        for (size_t off = 0; off < v.row; off += 64) {
            __builtin_prefetch(v.data + c*v.row + off, 0, 1);
        }
    }
}

// the src slots of the partials op (see llama_infllm_attn_one_query_cpu). SRC_Q: F32 [d_k, rows],
// n_head rows each: the scaled query for the ring; with memory the one for memory (the sinks, with
// keys at their own positions); with those, one per picked block, then the rotation table's rows
enum { SRC_Q, SRC_K, SRC_V, SRC_MASK, SRC_K_POOL, SRC_V_POOL, SRC_SLOTS, SRC_K_SINKS, SRC_V_SINKS, SRC_COUNT };
static_assert(SRC_COUNT < GGML_MAX_SRC, "ggml_custom_4d takes fewer sources");

// the partials op's settings, packed into its userdata: the block size, and with keys at their
// own positions the RoPE's rotated dimensions (0 otherwise) and layout
struct op_config {
    int64_t bs        = 1;
    int     rope_dims = 0;
    bool    rope_neox = false;

    void * pack() const {
        static_assert(sizeof(uintptr_t) >= 8, "the settings take 64 bits");
        return (void *) (uintptr_t) ((uint64_t) bs | (uint64_t) rope_dims << 32 | (uint64_t) rope_neox << 48);
    }
    static op_config unpack(const void * u) {
        const uint64_t x = (uint64_t) (uintptr_t) u;
        return {(int64_t) (x & 0xffffffffu), (int) ((x >> 32) & 0xffffu), ((x >> 48) & 1u) != 0};
    }
};

// the cells of the attended rows (mask columns) come in segments that are contiguous in one
// tensor: each picked block in the pool, the sinks, the ring
struct segment {
    rows          k, v;
    const float * q;        // the query that sees this segment
    int64_t       start;    // first cell
    int64_t       end;      // one past the last cell
    int64_t       row0;     // row of the first cell in k / v
    bool          turn;     // keys turned by their offset in the segment (rotation table row)
};

struct cell_map {
    int64_t n_blk = 0, bs = 1, n_init = 0, n_mem = 0, n_kv = 0;
    const int32_t * slots = nullptr;
    rows k_pool{}, v_pool{}, k_sinks{}, v_sinks{}, k_ring{}, v_ring{};
    const float * q = nullptr;
    const float * q_mem = nullptr;
    const float * q_blk = nullptr;   // keys at their own positions: block b's query at q_blk + b*q_stride
    int64_t       q_stride = 0;
    const float * rot = nullptr;     // and the rotation table, row i at rot + i*d_k

    segment at(int64_t c) const {
        if (c < n_blk*bs) {
            const int64_t b = c/bs;
            return {k_pool, v_pool, rot ? q_blk + b*q_stride : q_mem, b*bs, (b + 1)*bs, (int64_t) slots[b]*bs,
                    rot != nullptr};
        }
        if (c < n_mem) {
            return {k_sinks, v_sinks, q_mem, n_blk*bs, n_mem, 0, rot != nullptr};
        }
        return {k_ring, v_ring, q, n_mem, n_kv, 0, false};
    }
};

// rows of a 2d [d*n_kv_head, n] tensor (pool, sinks)
rows rows_2d(const ggml_tensor * t, int64_t d, int64_t n_kv_h, int n_gqa) {
    return {t ? (const char *) t->data : nullptr, t ? t->nb[1] : 0, t ? ggml_row_size(t->type, d) : 0, n_kv_h, n_gqa, d,
            t ? t->type : GGML_TYPE_F16};
}

// dst: F32 [2 + d_v, n_head, n_chunks]: per (query head, chunk) the running max, the sum of
// exponentials and the unnormalised output. src: see the SRC_ enum; userdata: the block size.
// A work unit is one chunk of cells for every head: the cells' rows are read in order, tile
// after tile, and each tile's rows serve all KV heads while they are in the cache.
void partials_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const ggml_tensor * q    = dst->src[SRC_Q];
    const ggml_tensor * k    = dst->src[SRC_K];
    const ggml_tensor * v    = dst->src[SRC_V];
    const ggml_tensor * mask = dst->src[SRC_MASK];
    const op_config     cfg  = op_config::unpack(userdata);

    const int64_t d_k      = k->ne[0];
    const int64_t d_v      = v->ne[0];
    const int64_t n_kv_h   = k->ne[1];
    const int64_t n_head   = dst->ne[1];
    const int     n_gqa    = (int) (n_head/n_kv_h);
    const int64_t n_chunks = dst->ne[2];
    const kernels kern     = pick_kernels(d_k, d_v, n_gqa);
    const ggml_fp16_t * mrow = (const ggml_fp16_t *) mask->data;

    cell_map map;
    map.n_kv   = mask->ne[0];
    map.q      = (const float *) q->data;
    // a ring cell's row holds every KV head: nb[2] bytes from one cell to the next
    map.k_ring = {(const char *) k->data, k->nb[2], k->nb[1], n_kv_h, n_gqa, d_k, k->type};
    map.v_ring = {(const char *) v->data, v->nb[2], v->nb[1], n_kv_h, n_gqa, d_v, v->type};
    if (q->ne[1] > n_head) {
        map.q_mem   = (const float *) q->data + n_head*d_k;
        map.bs      = cfg.bs;
        map.slots   = dst->src[SRC_SLOTS] ? (const int32_t *) dst->src[SRC_SLOTS]->data : nullptr;
        map.n_blk   = dst->src[SRC_SLOTS] ? dst->src[SRC_SLOTS]->ne[0] : 0;
        if (cfg.rope_dims > 0) {
            map.q_stride = n_head*d_k;
            map.q_blk    = map.q_mem + map.q_stride;
            map.rot      = map.q_blk + map.n_blk*map.q_stride;
        }
        map.n_init  = dst->src[SRC_K_SINKS] ? dst->src[SRC_K_SINKS]->ne[1] : 0;
        map.k_pool  = rows_2d(dst->src[SRC_K_POOL], d_k, n_kv_h, n_gqa);
        map.v_pool  = rows_2d(dst->src[SRC_V_POOL], d_v, n_kv_h, n_gqa);
        map.k_sinks = rows_2d(dst->src[SRC_K_SINKS], d_k, n_kv_h, n_gqa);
        map.v_sinks = rows_2d(dst->src[SRC_V_SINKS], d_v, n_kv_h, n_gqa);
    }
    map.n_mem = map.n_blk*map.bs + map.n_init;
    const int64_t n_kv = map.n_kv;

    std::vector<float>   s((size_t) n_head*TILE);
    std::vector<float>   acc((size_t) n_head*d_v);
    std::vector<int64_t> cells(TILE);
    std::vector<float>   bias(TILE);
    std::vector<float>   m(n_head), l(n_head);
    // a tile's keys turned to their own positions, f32, read as rows 0 .. n-1
    std::vector<float>   turned(map.rot ? (size_t) TILE*n_kv_h*d_k : 0);
    std::vector<int64_t> tile_rows(TILE);
    for (int j = 0; j < TILE; ++j) {
        tile_rows[j] = j;
    }
    const rows turned_rows = {(const char *) turned.data(), n_kv_h*d_k*sizeof(float), d_k*sizeof(float), n_kv_h,
                              n_gqa, d_k, GGML_TYPE_F32};

    // chunks hold equal numbers of attended cells: masked ones (the ring cells before the
    // window, kept for rewinding, and the padding) cost no work and must not unbalance threads
    std::vector<int64_t> bound(n_chunks + 1, n_kv);
    bound[0] = 0;
    {
        int64_t total = 0;
        for (int64_t c = 0; c < n_kv; ++c) {
            total += mask_value(mrow[c]) != -INFINITY;
        }
        int64_t seen = 0;
        int64_t k    = 1;
        for (int64_t c = 0; c < n_kv && k < n_chunks; ++c) {
            if (mask_value(mrow[c]) == -INFINITY) {
                continue;
            }
            while (k < n_chunks && seen == k*total/n_chunks) {
                bound[k++] = c;
            }
            ++seen;
        }
    }

    // each thread takes a contiguous run of chunks, so its reads (and prefetches) run straight on
    const int64_t ch0 = ith*n_chunks/nth;
    const int64_t ch1 = (ith + 1)*n_chunks/nth;
    const int64_t c_end = bound[ch1];
    for (int64_t ch = ch0; ch < ch1; ++ch) {
        const int64_t c0 = bound[ch];
        const int64_t c1 = bound[ch + 1];

        std::fill(m.begin(), m.end(), -INFINITY);
        std::fill(l.begin(), l.end(), 0.0f);
        std::fill(acc.begin(), acc.end(), 0.0f);

        segment seg = map.at(c0);
        for (int64_t t = c0; t < c1; ) {
            if (t >= seg.end) {
                seg = map.at(t);
            }
            // a tile never crosses a segment: its rows are in one tensor and see one query
            const int64_t t1 = std::min({t + TILE, c1, seg.end});
            const int64_t pf = t + PREFETCH_TILES*TILE;
            if (pf < c_end && mask_value(mrow[pf]) != -INFINITY) {
                const segment ps = pf < seg.end ? seg : map.at(pf);
                const int64_t r0 = ps.row0 + (pf - ps.start);
                prefetch_rows(ps.k, ps.v, r0, r0 + std::min<int64_t>(TILE, std::min(ps.end, c_end) - pf));
            }
            int n = 0;
            for (int64_t c = t; c < t1; ++c) {
                const float mv = mask_value(mrow[c]);
                if (mv != -INFINITY) {
                    cells[n] = seg.row0 + (c - seg.start);
                    bias[n]  = mv;
                    ++n;
                }
            }
            t = t1;
            if (n == 0) {
                continue;
            }
            if (seg.turn) {
                for (int j = 0; j < n; ++j) {
                    const float * t = map.rot + (cells[j] - seg.row0)*d_k;   // the cell's offset in the segment
                    for (int64_t h = 0; h < n_kv_h; ++h) {
                        kern.turn(seg.k, seg.k.data + cells[j]*seg.k.row + h*seg.k.head, t,
                                  turned.data() + (j*n_kv_h + h)*d_k, cfg.rope_dims, cfg.rope_neox);
                    }
                }
                kern.score(seg.q, turned_rows, tile_rows.data(), n, s.data());
            } else {
                kern.score(seg.q, seg.k, cells.data(), n, s.data());
            }
            for (int64_t hq = 0; hq < n_head; ++hq) {
                const float r = kern.softmax(s.data() + hq*TILE, bias.data(), n, m[hq], l[hq]);
                if (r != 1.0f) {
                    for (int64_t i = 0; i < d_v; ++i) {
                        acc[hq*d_v + i] *= r;
                    }
                }
            }
            kern.accumulate(s.data(), seg.v, cells.data(), n, acc.data());
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

// dst: F32 [d, n, ...] of unit patterns (llama_infllm_attn_rot_unit); userdata: an op_config
void rot_unit_op(ggml_tensor * dst, int ith, int, void * userdata) {
    if (ith != 0) {
        return;
    }
    const op_config cfg = op_config::unpack(userdata);
    const int64_t d = dst->ne[0];
    for (int64_t r = 0; r < ggml_nrows(dst); ++r) {
        float * x = (float *) dst->data + r*d;
        std::fill(x, x + d, 0.0f);
        for (int j = 0; j < cfg.rope_dims/2; ++j) {
            x[cfg.rope_neox ? j : 2*j] = 1.0f;
        }
    }
}

} // namespace

ggml_tensor * llama_infllm_attn_rot_unit(ggml_context * ctx, ggml_tensor * src, int64_t d, int64_t n,
                                         int rope_dims, bool rope_neox) {
    GGML_ASSERT(rope_dims > 0 && rope_dims % 2 == 0 && rope_dims <= d);
    op_config cfg;
    cfg.rope_dims = rope_dims;
    cfg.rope_neox = rope_neox;
    ggml_tensor * args[] = {src};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, d, 1, n, 1, args, 1, rot_unit_op, 1, cfg.pack());
}

bool llama_infllm_attn_cpu_type_ok(ggml_type type) {
    return type == GGML_TYPE_F16 || type == GGML_TYPE_Q8_0;
}

bool llama_infllm_attn_cpu_vectorized() {
#ifdef INFLLM_X86_KERNELS
    return cpu_has_avx2();
#else
    return false;
#endif
}

ggml_tensor * llama_infllm_attn_one_query_cpu(ggml_context * ctx, ggml_tensor * q, ggml_tensor * k, ggml_tensor * v,
                                              const llama_infllm_attn_memory * mem, ggml_tensor * mask,
                                              float kq_scale, int n_chunks) {
    GGML_ASSERT(q->type == GGML_TYPE_F32 && q->ne[2] == 1 && ggml_is_contiguous(q));
    GGML_ASSERT(llama_infllm_attn_cpu_type_ok(k->type) && llama_infllm_attn_cpu_type_ok(v->type) && mask->type == GGML_TYPE_F16);
    GGML_ASSERT(k->ne[0] == q->ne[0] && q->ne[1] % k->ne[1] == 0 && v->ne[1] == k->ne[1] && k->ne[2] == v->ne[2]);
    GGML_ASSERT(k->nb[0] == ggml_type_size(k->type) && v->nb[0] == ggml_type_size(v->type));

    const int64_t d_k    = q->ne[0];
    const int64_t n_head = q->ne[1];
    ggml_tensor * args[SRC_COUNT] = {nullptr, k, v, mask};
    int64_t n_mem = 0;
    op_config cfg;
    ggml_tensor * qs  = ggml_reshape_2d(ctx, q, d_k, n_head);   // the queries as rows (see SRC_Q)
    ggml_tensor * rot = nullptr;
    if (mem != nullptr) {
        GGML_ASSERT(mem->q->type == GGML_TYPE_F32 && ggml_are_same_shape(mem->q, q) && mem->block_size > 0);
        for (const ggml_tensor * t : {mem->k_pool, mem->v_pool, mem->k_sinks, mem->v_sinks}) {
            GGML_ASSERT(t == nullptr || (llama_infllm_attn_cpu_type_ok(t->type) && t->nb[0] == ggml_type_size(t->type)));
        }
        GGML_ASSERT(mem->slots == nullptr || mem->slots->type == GGML_TYPE_I32);
        const int64_t n_blk  = mem->slots ? mem->slots->ne[0] : 0;
        const int64_t n_init = mem->k_sinks ? mem->k_sinks->ne[1] : 0;
        qs = ggml_concat(ctx, qs, ggml_reshape_2d(ctx, ggml_cont(ctx, mem->q), d_k, n_head), 1);
        if (mem->rot != nullptr) {
            GGML_ASSERT(mem->rot->type == GGML_TYPE_F32 && ggml_is_contiguous(mem->rot) && mem->rot->ne[0] == d_k &&
                        ggml_nrows(mem->rot) >= std::max<int64_t>(mem->block_size, n_init));
            GGML_ASSERT(mem->rope_dims > 0 && mem->rope_dims % 2 == 0 && mem->rope_dims <= d_k);
            GGML_ASSERT((n_blk == 0) == (mem->q_blocks == nullptr));
            if (n_blk > 0) {
                GGML_ASSERT(mem->q_blocks->type == GGML_TYPE_F32 && mem->q_blocks->ne[0] == d_k &&
                            mem->q_blocks->ne[1] == n_head && mem->q_blocks->ne[2] == n_blk);
                qs = ggml_concat(ctx, qs, ggml_reshape_2d(ctx, ggml_cont(ctx, mem->q_blocks), d_k, n_head*n_blk), 1);
            }
            rot = ggml_reshape_2d(ctx, mem->rot, d_k, ggml_nrows(mem->rot));
            cfg.rope_dims = mem->rope_dims;
            cfg.rope_neox = mem->rope_neox;
        }
        args[SRC_K_POOL]  = mem->k_pool;
        args[SRC_V_POOL]  = mem->v_pool;
        args[SRC_SLOTS]   = mem->slots;
        args[SRC_K_SINKS] = mem->k_sinks;
        args[SRC_V_SINKS] = mem->v_sinks;
        n_mem = n_blk*mem->block_size + n_init;
        cfg.bs = mem->block_size;
    }
    GGML_ASSERT(mask->ne[0] == n_mem + k->ne[2]);
    qs = ggml_scale(ctx, qs, kq_scale);   // the queries, not the rotation table
    args[SRC_Q] = rot ? ggml_concat(ctx, qs, rot, 1) : qs;

    ggml_tensor * part = ggml_custom_4d(ctx, GGML_TYPE_F32, v->ne[0] + 2, n_head, n_chunks, 1, args, SRC_COUNT,
                                        partials_op, GGML_N_TASKS_MAX, cfg.pack());
    ggml_tensor * margs[] = {part};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, v->ne[0]*n_head, 1, 1, 1, margs, 1, merge_op, GGML_N_TASKS_MAX, nullptr);
}
