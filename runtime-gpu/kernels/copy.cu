// Copy: the bandwidth baseline of the benchmark (each word read once and written once).
#include "kvq.cuh"

extern "C" __global__ void kvq_copy(const uint4 *src, uint4 *dst, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
