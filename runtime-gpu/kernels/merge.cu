// Merge: the splits' partial softmax states of one query head into its output (Flash-Decoding's
// second step). Grid (q_heads, queries), one thread a channel.
#include "kvq.cuh"

extern "C" __global__ void kvq_merge(const float *part_o, const float *part_ml, unsigned splits, unsigned d,
                                     float *out) {
    unsigned row = blockIdx.y * gridDim.x + blockIdx.x; // query * q_heads + query head
    const float *ml = part_ml + (unsigned long long)row * splits * 2u;
    float m = __int_as_float(0xff800000);
    for (unsigned s = 0; s < splits; s++) m = fmaxf(m, ml[2u * s]);
    for (unsigned c = threadIdx.x; c < d; c += blockDim.x) {
        float l = 0.0f, o = 0.0f;
        for (unsigned s = 0; s < splits; s++) {
            float ms = ml[2u * s];
            if (ms == __int_as_float(0xff800000)) continue; // an empty split
            float w = expf(ms - m);
            l = fmaf(ml[2u * s + 1u], w, l);
            o = fmaf(part_o[((unsigned long long)row * splits + s) * d + c], w, o);
        }
        out[(unsigned long long)row * d + c] = o / l;
    }
}
