/* Few-row fp32 products for decoding: y[m, o] = sum_i x[m, i] * w[o, i] (+ b[o]), for m < rows.

   A decoding step multiplies one row per sequence by every weight of the model, so it is bound by how fast
   the weights stream from memory, not by arithmetic. The weight is packed once (gptforge.native.pack) into
   tiles of four output rows interleaved by vectors of W floats, [w0[0:W], w1[0:W], w2[0:W], w3[0:W],
   w0[W:2W], ...], rows padded with zeros to a multiple of W and to a multiple of four rows, so that the
   whole product reads one sequential stream, prefetched ahead. A tile's four weight rows are summed against
   up to four input rows at once (sixteen sums in registers: the weights are read once for four rows). The
   tiles are shared among the threads of torch's own OpenMP runtime (this file is linked against the libgomp
   torch has loaded, so no second thread pool competes with it). Written with GCC/Clang vector extensions,
   which compile to the widest vectors the processor has (-march=native). */

#define W 16        /* floats per vector */
#define AHEAD 2048  /* floats prefetched ahead of the one being read (8 KB) */
typedef float vf __attribute__((vector_size(W * sizeof(float)), aligned(sizeof(float))));

static inline vf load(const float *p) {
    vf v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline float hsum(vf v) {
    float s = 0.f;
    for (int k = 0; k < W; k++)
        s += v[k];
    return s;
}

/* s[j][r] = dot(row j of packed tile t, x row r) for j < 4, r < R; `in` is a multiple of W. R is a
   constant where this is inlined, so the sums stay in registers. */
static inline __attribute__((always_inline)) void tile(const float *restrict t, const float *restrict x, long in,
                                                         const int R, float s[4][4]) {
    vf acc[4][4] = {{{0}}};
    for (long i = 0; i < in; i += W) {
        const float *p = t + 4 * i;
        for (int q = 0; q < 4; q++)
            __builtin_prefetch(p + AHEAD + q * W);
        vf w0 = load(p), w1 = load(p + W), w2 = load(p + 2 * W), w3 = load(p + 3 * W);
        for (int r = 0; r < R; r++) {
            vf xv = load(x + r * in + i);
            acc[0][r] += w0 * xv, acc[1][r] += w1 * xv, acc[2][r] += w2 * xv, acc[3][r] += w3 * xv;
        }
    }
    for (int j = 0; j < 4; j++)
        for (int r = 0; r < R; r++)
            s[j][r] = hsum(acc[j][r]);
}

static void tile_rows(const float *t, const float *x, long in, long rows, float s[4][4]) {
    switch (rows) {
    case 1: tile(t, x, in, 1, s); break;
    case 2: tile(t, x, in, 2, s); break;
    case 3: tile(t, x, in, 3, s); break;
    default: tile(t, x, in, 4, s); break;
    }
}

/* wp: the packed weight of `out` rows of `in` floats (in a multiple of W); x: rows x in; y: rows x out. */
void gptforge_gemv(const float *wp, const float *x, const float *b, float *y, long out, long in, long rows) {
    long tiles = (out + 3) / 4;
#pragma omp parallel for schedule(static)
    for (long k = 0; k < tiles; k++) {
        long o = 4 * k, live = out - o < 4 ? out - o : 4;
        for (long m = 0; m < rows; m += 4) {
            long n = rows - m < 4 ? rows - m : 4;
            float s[4][4];
            tile_rows(wp + o * in, x + m * in, in, n, s);
            for (long r = 0; r < n; r++)
                for (long j = 0; j < live; j++)
                    y[(m + r) * out + o + j] = s[j][r] + (b ? b[o + j] : 0.f);
        }
    }
}
