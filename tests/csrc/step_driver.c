/* Runs gptforge's decoding kernel (src/gptforge/csrc/decode.c, included whole) on inputs written by
   tests/test_arm64.py, for checking a build for another processor (aarch64 under qemu-user) against
   references computed on this one. Input: arrays one after another, each an int64 byte count then the bytes:
   a header of int64s, eps (float), the token ids and positions (int64), then the model's tensors in the order
   read below, then a product's packed weights and input. Output: the logits, each layer's keys and values,
   and the product's fp32 and int8 results, as raw floats. */
#include <stdio.h>
#include <stdlib.h>

#include "decode.c"

static FILE *in;

static void *next(void) {
    long long n;
    if (fread(&n, sizeof n, 1, in) != 1)
        exit(2);
    if (n == 0)
        return NULL; /* an absent tensor (a weight without bias) */
    void *p = malloc(n);
    if (!p || fread(p, 1, n, in) != (size_t)n)
        exit(3);
    return p;
}

static Weight weight(long out, long width, int q8) {
    Weight w = {next(), NULL, NULL, out, width}; /* one read per statement: their order is the file's */
    w.bias = next();
    if (q8)
        w.scale = next();
    return w;
}

int main(int argc, char **argv) {
    if (argc == 2 && !strcmp(argv[1], "width")) /* the packed layout this build reads: values per vector */
        return printf("%d\n", gptforge_vector_width()) < 0;
    if (argc != 3 || !(in = fopen(argv[1], "rb")))
        return 1;
    long long *h = next(); /* n_layer n_head n_embd mlp_width max_len act rows past vocab prows pout pwidth */
    float *eps = next();
    long *ids = next(), *pos = next();
    long C = padded(h[2]), F = padded(h[3]);
    Layer *layers = calloc(h[0], sizeof(Layer));
    Model m = {h[0], h[1], h[2], h[3], h[4], *eps, h[5], NULL, NULL, NULL, NULL, {0}, layers};
    m.wte = next(), m.wpe = next(), m.lnf_w = next(), m.lnf_b = next();
    m.head = weight(h[8], C, 0);
    for (long l = 0; l < h[0]; l++) {
        Layer *L = layers + l;
        L->ln1_w = next(), L->ln1_b = next();
        L->attn = weight(3 * h[2], C, 0), L->attn_proj = weight(h[2], C, 0);
        L->ln2_w = next(), L->ln2_b = next();
        L->fc = weight(h[3], C, 0), L->mlp_proj = weight(h[2], F, 0);
        L->k = next(), L->v = next();
    }
    long rows = h[6], prows = h[9], pout = h[10], pwidth = h[11];
    float *logits = malloc(rows * h[8] * sizeof(float));
    if (gptforge_step(&m, ids, pos, rows, h[7], NULL, logits))
        return 4;
    Weight w32 = weight(pout, pwidth, 0);
    Weight w8 = weight(pout, pwidth, 1);
    float *x = next(), *y32 = malloc(prows * pout * sizeof(float)), *y8 = malloc(prows * pout * sizeof(float));
    gptforge_gemv(w32.data, NULL, x, w32.bias, y32, pout, pwidth, prows);
    gptforge_gemv(w8.data, w8.scale, x, w8.bias, y8, pout, pwidth, prows);
    FILE *out = fopen(argv[2], "wb");
    long cache = h[1] * h[4] * (h[2] / h[1]) * rows;
    fwrite(logits, sizeof(float), rows * h[8], out);
    for (long l = 0; l < h[0]; l++)
        fwrite(layers[l].k, sizeof(float), cache, out), fwrite(layers[l].v, sizeof(float), cache, out);
    fwrite(y32, sizeof(float), prows * pout, out);
    fwrite(y8, sizeof(float), prows * pout, out);
    return fclose(out) != 0;
}
