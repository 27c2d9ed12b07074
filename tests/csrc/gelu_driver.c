/* Runs csrc/gelu.c on values from a file, for the ARM64 test (built with a cross compiler, run under qemu).
   Input: n as int64, then n floats x and n floats g. Output: n floats gelu(x), then n floats g * gelu'(x). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

void gptforge_gelu(const float *x, float *y, long n);
void gptforge_gelu_backward(const float *x, const float *g, float *dx, long n);

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    int64_t n;
    if (!in || !out || fread(&n, sizeof n, 1, in) != 1) return 1;
    float *x = malloc(n * sizeof *x), *g = malloc(n * sizeof *g), *y = malloc(n * sizeof *y), *dx = malloc(n * sizeof *dx);
    if (fread(x, sizeof *x, n, in) != (size_t)n || fread(g, sizeof *g, n, in) != (size_t)n) return 1;
    gptforge_gelu(x, y, n);
    gptforge_gelu_backward(x, g, dx, n);
    fwrite(y, sizeof *y, n, out);
    fwrite(dx, sizeof *dx, n, out);
    return fclose(out) != 0;
}
