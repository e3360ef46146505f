// Append: the two passes of kvq.cuh's append items, one thread an item. `kvq_append_quantize` must finish
// before `kvq_append_store` starts (it reads window slots the store pass overwrites): the host launches
// them in that order on one stream.
#include "kvq.cuh"

extern "C" __global__ void kvq_append_quantize(unsigned *arena, KvqLayout l, KvqAppend a, const float *keys,
                                               const float *values) {
    unsigned item = blockIdx.x * blockDim.x + threadIdx.x;
    if (item < kvq_quantize_items(&l, &a)) kvq_quantize_item(arena, &l, &a, keys, values, item);
}

extern "C" __global__ void kvq_append_store(unsigned *arena, KvqLayout l, KvqAppend a, const float *keys,
                                            const float *values) {
    unsigned item = blockIdx.x * blockDim.x + threadIdx.x;
    if (item < kvq_store_items(&l, &a)) kvq_store_item(arena, &l, &a, keys, values, item);
}
