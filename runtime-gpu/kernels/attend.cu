// Attend: the first step of split-KV attention (Flash-Decoding) over the cache, for decode (one query
// position after the append) and prefill (a chunk of positions over the cache plus the chunk's own keys
// and values in f32, causal).
//
// Grid (splits, kv_heads, queries); 128 threads, four warps. Block (s, h, i) covers held tokens
// [s*split, (s+1)*split) of query position i (position i of a prefill chunk also sees chunk tokens 0..=i,
// numbered after the held ones). All G query heads of KV head h share one read of every key and value:
// - scores: a warp takes a tile of 32 tokens, a lane a token; the lane dequantizes its token's key
//   channel by channel (per-channel codes: 32/b lanes share a word) and forms G dot products;
// - softmax: online, per warp (max and sum over the tile by butterfly shuffles);
// - values: a lane takes channels lane, lane+32, ...; each token's row is read once for all G heads.
// The four warps take tiles w, w+4, ... and merge through shared memory; the block writes its unnormalized
// output, running max and sum to part_o [queries][q_heads][splits][d] and part_ml [..][splits][2].
// Each element is dequantized as kvq-core dequantizes it (code * scale + zero, two roundings); the scales
// are not folded into the query as kvq-core's CPU kernels fold them, because a tile of 32 tokens can
// straddle a key group, the sinks and the window.
//
// `kvq_attend_gG` reads KIVI's plain formats; `kvq_attend_generic_gG` also reads every calibrated format
// through kvq.cuh's generic reader: a lane rebuilds its token's whole key row (codes, parameters,
// codebooks, outliers, tier corrections, then the inverse transforms) in local memory and scores it; for
// values, each lane rebuilds its token's row and the warp reads it from shared memory one token at a
// time. The rows are kvq-core's `Cache::dequantize` bit for bit, so the arithmetic after them is the plain
// kernel's.
#include "kvq.cuh"

#define KVQ_WARPS 4u
#define KVQ_NEG_INF __int_as_float(0xff800000)

// Where token t's row of one stream is: a pointer to f16 row (sinks, window, fp16 value body), or f32
// (chunk), or a body slot of a coded / fp16-key stream.
struct Row {
    unsigned kind; // 0 f16 row, 1 f32 row, 2 fp16 key body slot, 3 coded body slot
    const unsigned short *h;
    const float *f;
    unsigned slot;
    unsigned j; // logical body index (body slots)
};

__device__ __forceinline__ Row kvq_row(const unsigned *arena, const KvqLayout &l, const KvqCounts &k, int keys,
                                       unsigned h, unsigned held, unsigned t, const float *chunk) {
    const KvqStream *s = keys ? &l.keys : &l.values;
    unsigned d = l.head_dim;
    Row r;
    r.h = 0;
    r.f = 0;
    r.slot = 0;
    r.j = 0;
    if (t >= held) {
        r.kind = 1u;
        r.f = chunk + ((unsigned long long)(t - held) * l.kv_heads + h) * d;
        return r;
    }
    unsigned at;
    unsigned where = kvq_locate(&l, &k, keys ? k.key_q_end : k.value_q_end, s, t, &at);
    if (where == 0u) {
        r.kind = 0u;
        r.h = (const unsigned short *)(arena + s->sinks) + (h * l.sinks + at) * d;
    } else if (where == 1u) {
        r.kind = 0u;
        r.h = (const unsigned short *)(arena + s->window) + (h * l.residual + at) * d;
    } else if (s->kind == KVQ_F16 && !keys) {
        r.kind = 0u;
        r.h = (const unsigned short *)(arena + s->codes) + (h * s->ring + at) * d;
    } else {
        r.kind = s->kind == KVQ_F16 ? 2u : 3u;
        r.slot = at;
        r.j = k.base + (t - k.sinks);
    }
    return r;
}

template <int G, bool GEN>
__device__ void kvq_attend(const unsigned *__restrict__ arena, const KvqLayout l, const KvqCounts k,
                           const float *__restrict__ q, const float *__restrict__ ck,
                           const float *__restrict__ cv, float scale, unsigned split, float *__restrict__ part_o,
                           float *__restrict__ part_ml) {
    __shared__ float qs[G][KVQ_MAX_HEAD_DIM];
    __shared__ float wm[KVQ_WARPS][G], wl[KVQ_WARPS][G];
    __shared__ float wo[KVQ_WARPS][G][KVQ_MAX_HEAD_DIM];
    __shared__ float vbuf[GEN ? KVQ_WARPS : 1][GEN ? KVQ_MAX_HEAD_DIM : 1];
    const unsigned s = blockIdx.x, h = blockIdx.y, i = blockIdx.z, splits = gridDim.x;
    const unsigned d = l.head_dim, q_heads = l.kv_heads * G;
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    const unsigned held = k.sinks + k.n - k.base;
    const unsigned total = held + (ck ? i + 1u : 0u);
    const unsigned t0 = s * split, t1 = min(t0 + split, total);

    for (unsigned e = threadIdx.x; e < G * d; e += blockDim.x)
        qs[e / d][e % d] = q[((unsigned long long)i * q_heads + h * G) * d + e] * scale;
    __syncthreads();

    const KvqStream &ks = l.keys, &vs = l.values;
    const unsigned key_head = ks.kind == KVQ_F16 ? h * d * ks.ring : h * kvq_key_head_words(&ks, d);
    float m[G], sum[G], o[G][8];
#pragma unroll
    for (int r = 0; r < G; r++) {
        m[r] = KVQ_NEG_INF;
        sum[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < 8; c++) o[r][c] = 0.0f;
    }

    for (unsigned tile = t0 + warp * 32u; tile < t1; tile += KVQ_WARPS * 32u) {
        // Scores: lane = token.
        const unsigned t = tile + lane;
        float sc[G];
#pragma unroll
        for (int r = 0; r < G; r++) sc[r] = 0.0f;
        if (t < t1) {
            Row row = kvq_row(arena, l, k, 1, h, held, t, ck);
            if (GEN && ks.generic && row.kind == 3u) {
                float kr[KVQ_MAX_HEAD_DIM];
                kvq_generic_row(arena, &l, 1, h, row.j, kr);
                for (unsigned c = 0; c < d; c++) {
#pragma unroll
                    for (int r = 0; r < G; r++) sc[r] = fmaf(qs[r][c], kr[c], sc[r]);
                }
            } else {
                for (unsigned c = 0; c < d; c++) {
                    float kv;
                    if (row.kind == 0u) {
                        kv = kvq_h2f(row.h[c]);
                    } else if (row.kind == 1u) {
                        kv = row.f[c];
                    } else if (row.kind == 2u) {
                        kv = kvq_h2f(kvq_half_at(arena, ks.codes, key_head + kvq_key_f16(row.slot, c, d)));
                    } else {
                        const unsigned *words = arena + ks.codes + key_head + kvq_key_row(&ks, row.slot, c, d);
                        unsigned code = kvq_code(words, row.slot & (ks.block - 1u), ks.bits);
                        unsigned p = kvq_key_param(&ks, h, row.slot, c, d);
                        kv = kvq_deq(code, kvq_h2f(kvq_half_at(arena, ks.scale, p)), kvq_h2f(kvq_half_at(arena, ks.zero, p)));
                    }
#pragma unroll
                    for (int r = 0; r < G; r++) sc[r] = fmaf(qs[r][c], kv, sc[r]);
                }
            }
        }
        // Online softmax over the tile.
        float p[G];
#pragma unroll
        for (int r = 0; r < G; r++) {
            float x = t < t1 ? sc[r] : KVQ_NEG_INF, mx = x;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            float mn = fmaxf(m[r], mx);
            float alpha = m[r] == KVQ_NEG_INF ? 0.0f : expf(m[r] - mn);
            p[r] = t < t1 ? expf(x - mn) : 0.0f;
            float ps = p[r];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, off);
            sum[r] = fmaf(sum[r], alpha, ps);
            m[r] = mn;
#pragma unroll
            for (int c = 0; c < 8; c++) o[r][c] *= alpha;
        }
        // Values: lane = channels.
        const unsigned n = min(32u, t1 - tile);
        // Generic value rows: each lane rebuilds its own token's, shared with the warp token by token.
        float vr[GEN ? KVQ_MAX_HEAD_DIM : 1];
        if (GEN && vs.generic && lane < n) {
            Row own = kvq_row(arena, l, k, 0, h, held, tile + lane, cv);
            if (own.kind == 3u) kvq_generic_row(arena, &l, 0, h, own.j, vr);
        }
        for (unsigned j = 0; j < n; j++) {
            float pj[G];
#pragma unroll
            for (int r = 0; r < G; r++) pj[r] = __shfl_sync(0xffffffffu, p[r], j);
            Row row = kvq_row(arena, l, k, 0, h, held, tile + j, cv);
            // A generic row comes from its token's lane through the warp's buffer.
            const bool gen = GEN && vs.generic && row.kind == 3u;
            if (gen) {
                if (lane == j)
                    for (unsigned c = 0; c < d; c++) vbuf[GEN ? warp : 0][c] = vr[GEN ? c : 0];
                __syncwarp();
            }
            const unsigned *words = arena + vs.codes + (h * vs.ring + row.slot) * vs.row_words;
#pragma unroll
            for (int cc = 0; cc < 8; cc++) {
                unsigned c = lane + 32u * cc;
                if (c < d) {
                    float v;
                    if (gen) {
                        v = vbuf[GEN ? warp : 0][GEN ? c : 0];
                    } else if (row.kind == 0u) {
                        v = kvq_h2f(row.h[c]);
                    } else if (row.kind == 1u) {
                        v = row.f[c];
                    } else {
                        unsigned p2 = kvq_value_param(&vs, h, c / vs.group, row.slot);
                        v = kvq_deq(kvq_code(words, c, vs.bits), kvq_h2f(kvq_half_at(arena, vs.scale, p2)),
                                    kvq_h2f(kvq_half_at(arena, vs.zero, p2)));
                    }
#pragma unroll
                    for (int r = 0; r < G; r++) o[r][cc] = fmaf(pj[r], v, o[r][cc]);
                }
            }
            if (gen) __syncwarp();
        }
    }

    // Merge the warps.
#pragma unroll
    for (int r = 0; r < G; r++) {
        if (lane == 0u) {
            wm[warp][r] = m[r];
            wl[warp][r] = sum[r];
        }
#pragma unroll
        for (int cc = 0; cc < 8; cc++) {
            unsigned c = lane + 32u * cc;
            if (c < d) wo[warp][r][c] = o[r][cc];
        }
    }
    __syncthreads();
    const unsigned long long base = ((unsigned long long)i * q_heads + h * G) * splits + s;
    for (unsigned e = threadIdx.x; e < G * d; e += blockDim.x) {
        unsigned r = e / d, c = e % d;
        float mx = KVQ_NEG_INF;
        for (unsigned w = 0; w < KVQ_WARPS; w++) mx = fmaxf(mx, wm[w][r]);
        float acc = 0.0f, l2 = 0.0f;
        for (unsigned w = 0; w < KVQ_WARPS; w++) {
            if (wm[w][r] == KVQ_NEG_INF) continue;
            float f = expf(wm[w][r] - mx);
            acc = fmaf(wo[w][r][c], f, acc);
            l2 = fmaf(wl[w][r], f, l2);
        }
        part_o[(base + (unsigned long long)r * splits) * d + c] = acc;
        if (c == 0u) {
            part_ml[(base + (unsigned long long)r * splits) * 2u] = mx;
            part_ml[(base + (unsigned long long)r * splits) * 2u + 1u] = l2;
        }
    }
}

#define KVQ_ATTEND(G)                                                                                     \
    extern "C" __global__ void __launch_bounds__(128, 1) kvq_attend_g##G(                                     \
        const unsigned *arena, KvqLayout l, KvqCounts k, const float *q, const float *ck, const float *cv, \
        float scale, unsigned split, float *part_o, float *part_ml) {                                      \
        kvq_attend<G, false>(arena, l, k, q, ck, cv, scale, split, part_o, part_ml);                       \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(128, 1) kvq_attend_generic_g##G(                             \
        const unsigned *arena, KvqLayout l, KvqCounts k, const float *q, const float *ck, const float *cv, \
        float scale, unsigned split, float *part_o, float *part_ml) {                                      \
        kvq_attend<G, true>(arena, l, k, q, ck, cv, scale, split, part_o, part_ml);                        \
    }

KVQ_ATTEND(1)
KVQ_ATTEND(2)
KVQ_ATTEND(3)
KVQ_ATTEND(4)
KVQ_ATTEND(5)
KVQ_ATTEND(6)
KVQ_ATTEND(7)
KVQ_ATTEND(8)
