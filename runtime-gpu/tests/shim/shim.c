/* The device header's functions run on the host, for tests/header.rs (compiled there with the host C
 * compiler, no CUDA). Reads one request on stdin, writes the answer on stdout; all numbers are
 * little-endian 32-bit words.
 *   op 1 ABI:     (nothing)                               -> text: "name value" per line
 *   op 2 READ:    layout, counts, words W, arena[W]         -> f32 keys then values [heads][held][d]
 *                 (kvq_read_row: every format, calibrated ones through kvq_generic_row)
 *   op 4 HALF:    N, f32[N]                                 -> u16[N] (kvq_f2h), then f32[N] (kvq_h2f of i)
 *   op 3 APPEND:  layout, append, words W, arena[W], rows N, keys[N*hd], values[N*hd] -> arena[W]
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

#include "kvq.cuh"

static void read_exact(void *p, size_t n) {
    if (fread(p, 1, n, stdin) != n) {
        fprintf(stderr, "short input\n");
        exit(2);
    }
}

static unsigned read_u32(void) {
    unsigned v;
    read_exact(&v, 4);
    return v;
}

static unsigned *read_arena(unsigned *words) {
    *words = read_u32();
    unsigned *a = malloc((size_t)*words * 4 + 4);
    read_exact(a, (size_t)*words * 4);
    return a;
}

#define FIELD(T, f) printf("%s.%s %u\n", #T, #f, (unsigned)offsetof(T, f))

int main(void) {
    unsigned op = read_u32();
    if (op == 1) {
        printf("sizeof.KvqStream %u\nsizeof.KvqLayout %u\nsizeof.KvqCounts %u\nsizeof.KvqAppend %u\n",
               (unsigned)sizeof(KvqStream), (unsigned)sizeof(KvqLayout), (unsigned)sizeof(KvqCounts),
               (unsigned)sizeof(KvqAppend));
        FIELD(KvqStream, kind); FIELD(KvqStream, bits); FIELD(KvqStream, max_code); FIELD(KvqStream, group);
        FIELD(KvqStream, ring); FIELD(KvqStream, block); FIELD(KvqStream, row_words);
        FIELD(KvqStream, row_groups); FIELD(KvqStream, window_tokens); FIELD(KvqStream, sinks);
        FIELD(KvqStream, window); FIELD(KvqStream, codes); FIELD(KvqStream, scale); FIELD(KvqStream, zero);
        FIELD(KvqStream, generic); FIELD(KvqStream, params); FIELD(KvqStream, levels_n); FIELD(KvqStream, levels);
        FIELD(KvqStream, outliers_n); FIELD(KvqStream, outliers); FIELD(KvqStream, permuted);
        FIELD(KvqStream, perm); FIELD(KvqStream, bounds);
        FIELD(KvqLayout, kv_heads); FIELD(KvqLayout, head_dim); FIELD(KvqLayout, capacity);
        FIELD(KvqLayout, sinks); FIELD(KvqLayout, residual); FIELD(KvqLayout, total_words);
        FIELD(KvqLayout, keys); FIELD(KvqLayout, values);
        FIELD(KvqLayout, rope); FIELD(KvqLayout, rotate_keys); FIELD(KvqLayout, rotate_values);
        FIELD(KvqLayout, center_keys); FIELD(KvqLayout, balance_keys); FIELD(KvqLayout, rope_table);
        FIELD(KvqLayout, center); FIELD(KvqLayout, balance); FIELD(KvqLayout, tier_keep);
        FIELD(KvqLayout, tier_bits); FIELD(KvqLayout, tier_slot_words); FIELD(KvqLayout, tier_slots);
        FIELD(KvqCounts, sinks); FIELD(KvqCounts, n); FIELD(KvqCounts, base); FIELD(KvqCounts, key_q_end);
        FIELD(KvqCounts, value_q_end);
        FIELD(KvqAppend, sink0); FIELD(KvqAppend, sink_new); FIELD(KvqAppend, n0); FIELD(KvqAppend, tokens);
        FIELD(KvqAppend, key_blocks0); FIELD(KvqAppend, key_blocks); FIELD(KvqAppend, value_q0);
        FIELD(KvqAppend, value_q);
        printf("const.KVQ_F16 %u\nconst.KVQ_PER_CHANNEL %u\nconst.KVQ_PER_TOKEN %u\n", KVQ_F16, KVQ_PER_CHANNEL,
               KVQ_PER_TOKEN);
        printf("const.KVQ_KEY_BLOCK_F16 %u\nconst.KVQ_KEY_BLOCK %u\nconst.KVQ_MAX_GROUP %u\n", KVQ_KEY_BLOCK_F16,
               KVQ_KEY_BLOCK, KVQ_MAX_GROUP);
        printf("const.KVQ_MAX_HEAD_DIM %u\nconst.KVQ_MAX_RATIO %u\n", KVQ_MAX_HEAD_DIM, KVQ_MAX_RATIO);
        printf("const.KVQ_PARAMS_F16 %u\nconst.KVQ_PARAMS_FP8 %u\n", KVQ_PARAMS_F16, KVQ_PARAMS_FP8);
        printf("const.KVQ_ROPE_NONE %u\nconst.KVQ_ROPE_ADJACENT %u\nconst.KVQ_ROPE_HALVES %u\n", KVQ_ROPE_NONE,
               KVQ_ROPE_ADJACENT, KVQ_ROPE_HALVES);
        return 0;
    }
    if (op == 4) {
        unsigned n = read_u32();
        float *x = malloc((size_t)n * 4 + 4);
        read_exact(x, (size_t)n * 4);
        for (unsigned i = 0; i < n; i++) {
            unsigned short h = kvq_f2h(x[i]);
            fwrite(&h, 2, 1, stdout);
        }
        for (unsigned i = 0; i < n; i++) {
            float f = kvq_h2f((unsigned short)i);
            fwrite(&f, 4, 1, stdout);
        }
        return 0;
    }
    KvqLayout l;
    read_exact(&l, sizeof l);
    if (op == 2) {
        KvqCounts k;
        read_exact(&k, sizeof k);
        unsigned words;
        unsigned *arena = read_arena(&words);
        unsigned held = k.sinks + k.n - k.base;
        float row[KVQ_MAX_HEAD_DIM * 2];
        for (int keys = 1; keys >= 0; keys--)
            for (unsigned h = 0; h < l.kv_heads; h++)
                for (unsigned t = 0; t < held; t++) {
                    kvq_read_row(arena, &l, &k, keys, h, t, row);
                    fwrite(row, 4, l.head_dim, stdout);
                }
        return 0;
    }
    if (op == 3) {
        KvqAppend a;
        read_exact(&a, sizeof a);
        unsigned words;
        unsigned *arena = read_arena(&words);
        unsigned rows = read_u32(), n = rows * l.kv_heads * l.head_dim;
        float *keys = malloc((size_t)n * 4 + 4), *values = malloc((size_t)n * 4 + 4);
        read_exact(keys, (size_t)n * 4);
        read_exact(values, (size_t)n * 4);
        /* Items in reverse order: the result must not depend on the order the device runs them in. */
        for (unsigned i = kvq_quantize_items(&l, &a); i-- > 0;) kvq_quantize_item(arena, &l, &a, keys, values, i);
        for (unsigned i = kvq_store_items(&l, &a); i-- > 0;) kvq_store_item(arena, &l, &a, keys, values, i);
        fwrite(arena, 4, words, stdout);
        return 0;
    }
    fprintf(stderr, "unknown op %u\n", op);
    return 2;
}
