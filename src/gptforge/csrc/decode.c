/* Decoding on the CPU: few-row products, and a GPT-2 decoding step for up to eight sequences in one call.

   A decoding step multiplies one row per sequence by every weight of the model, so it is bound by how fast
   the weights stream from memory, not by arithmetic. Each weight is packed once (gptforge.native.pack) into
   tiles of four output rows interleaved by vectors of W values, [w0[0:W], w1[0:W], w2[0:W], w3[0:W],
   w0[W:2W], ...], rows padded with zeros to a multiple of W and to a multiple of four rows, so that a
   product reads one sequential stream, prefetched ahead. A tile's four weight rows are summed against up to
   four input rows at once (sixteen sums in registers: the weights are read once for four rows). Weights are
   fp32, or int8 with one fp32 scale per output row (widened to fp32 in registers: a quarter of the bytes
   to read, and the input rows stay fp32). The tiles are shared among the threads of torch's own OpenMP
   runtime (this file is linked against the libgomp torch has loaded, so no second thread pool competes).

   gptforge_step runs everything else of a step too (embeddings, layer norms, attention over the KV cache,
   activation, residual adds, the head), so that a token costs one call from Python rather than some 150
   small torch operations. Written with GCC/Clang vector extensions, which compile to the widest vectors
   the target has (-march=native, or the level gptforge.native.isa() names): AVX-512 or AVX2 on x86-64, NEON
   on ARM64; the only intrinsics, widening int8, have a plain C form for any other target. Built without
   -fopenmp (Apple's clang), the pragmas are ignored and it runs on one thread. */

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && !defined(__AVX512F__)
#define W 8 /* values per vector: one of AVX2's 256-bit registers (wider generic vectors go through memory) */
#elif defined(__ARM_NEON)
#define W 4 /* one of NEON's 128-bit registers: a tile's 16 sums, 4 inputs and a weight fit its 32 (with 16-float
              vectors GCC kept the sums on the stack: 176 stack accesses in the 4-row loop, none with these) */
#else
#define W 16 /* values per vector: AVX-512's (plain C builds take the same layout) */
#endif
#ifndef AHEAD_BYTES
#define AHEAD_BYTES 8192 /* prefetch distance in the weight stream */
#endif
#ifndef TILE_ROWS
#if defined(__AVX2__) && !defined(__AVX512F__)
#define TILE_ROWS 2 /* AVX2 has 16 vector registers: a tile's sums for two input rows take 8, their inputs 2 */
#else
#define TILE_ROWS 4 /* input rows summed against a tile at once (AVX-512's 32 registers: 16 sums, 4 inputs) */
#endif
#endif
#ifndef LOCALITY
#define LOCALITY 3 /* __builtin_prefetch's: 3 keeps the line in every cache level, 0 streams past them */
#endif
/* Tiles of at least this many input rows prefetch their weights in software (gptforge_set_prefetch): every tile,
   or only tiles of four rows, as on the AMD EPYC this was first tuned on, where the hardware kept up with one
   row's stream. On a Sapphire Rapids a one-row int8 step ran 2.4x faster with it. Set from the calibration
   (calibrate.py's `prefetch`), before any product runs. */
static int prefetch_rows = 1;
void gptforge_set_prefetch(int every_tile) { prefetch_rows = every_tile ? 1 : 4; }

/* vf: a vector in registers (naturally aligned, so that arrays of them, the sums of a tile, stay in registers);
   vfu: the same at any float's address, to load from the packed weights and the input rows */
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef float vfu __attribute__((vector_size(W * sizeof(float)), aligned(sizeof(float))));

typedef struct {
    const void *data;   /* packed tiles of `out` (padded to 4) rows of `in` values, fp32 or int8 */
    const float *scale; /* int8: one per output row; NULL: the weight is fp32 */
    const float *bias;  /* NULL: none */
    long out, in;       /* in: a multiple of W (input rows are that wide, zero-padded) */
} Weight;

enum { STORE, ADD, ACTIVATE };                                     /* what a product does with y */
enum { GELU_TANH, GELU_ERF, RELU, RELU_SQUARED, QUICK_GELU };      /* activations (model.py's _activation) */

static inline vf load(const float *p) {
    return *(const vfu *)p;
}

/* W int8 values widened to floats (compilers do not vectorise __builtin_convertvector from bytes well) */
static inline vf load8(const signed char *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
#elif defined(__ARM_NEON)
    int32_t four;
    __builtin_memcpy(&four, p, sizeof four); /* W = 4 bytes, at any address */
    int16x8_t wide = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four)));
    return (vf)vcvtq_f32_s32(vmovl_s16(vget_low_s16(wide)));
#else
    vf v;
    for (int k = 0; k < W; k++)
        v[k] = p[k];
    return v;
#endif
}

static inline float hsum(vf v) {
    float s = 0.f;
    for (int k = 0; k < W; k++)
        s += v[k];
    return s;
}

/* s[j][r] = dot(row j of the packed tile at t, x row r) for j < 4, r < R; R and q8 are constants where this
   is inlined, so the sums stay in registers. */
static inline __attribute__((always_inline)) void tile(const void *t, const int q8, const float *restrict x,
                                                         long in, const int R, float s[4][4]) {
    vf acc[4][4] = {{{0}}};
    const int ahead = R >= prefetch_rows;
    for (long i = 0; i < in; i += W) {
        vf xv[4];
        for (int r = 0; r < R; r++)
            xv[r] = load(x + r * in + i);
        for (int q = 0; q < 4; q++) { /* one weight vector live at a time: AVX2's 16 registers hold the rest */
            vf w;
            if (q8) {
                const signed char *p = (const signed char *)t + 4 * i + q * W;
                if (q == 0 && ahead)
                    __builtin_prefetch(p + AHEAD_BYTES, 0, LOCALITY);
                w = load8(p);
            } else {
                const float *p = (const float *)t + 4 * i + q * W;
                if (ahead)
                    __builtin_prefetch((const char *)p + AHEAD_BYTES, 0, LOCALITY);
                w = load(p);
            }
            for (int r = 0; r < R; r++)
                acc[q][r] += w * xv[r];
        }
    }
    for (int j = 0; j < 4; j++)
        for (int r = 0; r < R; r++)
            s[j][r] = hsum(acc[j][r]);
}

static void tile_rows(const void *t, int q8, const float *x, long in, long rows, float s[4][4]) {
    if (q8) {
        switch (rows) {
        case 1: tile(t, 1, x, in, 1, s); break;
        case 2: tile(t, 1, x, in, 2, s); break;
        case 3: tile(t, 1, x, in, 3, s); break;
        default: tile(t, 1, x, in, 4, s); break;
        }
    } else {
        switch (rows) {
        case 1: tile(t, 0, x, in, 1, s); break;
        case 2: tile(t, 0, x, in, 2, s); break;
        case 3: tile(t, 0, x, in, 3, s); break;
        default: tile(t, 0, x, in, 4, s); break;
        }
    }
}

static inline float activate(float u, int act) {
    switch (act) {
    case GELU_TANH: return 0.5f * u * (1.f + tanhf(0.7978845608028654f * (u + 0.044715f * u * u * u)));
    case GELU_ERF: return 0.5f * u * (1.f + erff(u * 0.7071067811865476f));
    case RELU: return u > 0.f ? u : 0.f;
    case RELU_SQUARED: return u > 0.f ? u * u : 0.f;
    default: return u / (1.f + expf(-1.702f * u));
    }
}

/* y[m * ys + o] (=, +=, = act of) (x[m] . w[o]) * scale[o] + bias[o] for m < rows; x is rows x w->in. */
static void product(const Weight *w, const float *x, long rows, float *y, long ys, int mode, int act) {
    long tiles = (w->out + 3) / 4, in = w->in;
    int q8 = w->scale != NULL;
#pragma omp parallel for schedule(static)
    for (long k = 0; k < tiles; k++) {
        long o = 4 * k, live = w->out - o < 4 ? w->out - o : 4;
        const void *t = q8 ? (const void *)((const signed char *)w->data + o * in)
                           : (const void *)((const float *)w->data + o * in);
        for (long m = 0; m < rows; m += TILE_ROWS) { /* a tile read again for more rows comes from the cache */
            long n = rows - m < TILE_ROWS ? rows - m : TILE_ROWS;
            float s[4][4];
            tile_rows(t, q8, x + m * in, in, n, s);
            for (long r = 0; r < n; r++)
                for (long j = 0; j < live; j++) {
                    float v = s[j][r] * (q8 ? w->scale[o + j] : 1.f) + (w->bias ? w->bias[o + j] : 0.f);
                    float *out = y + (m + r) * ys + o + j;
                    *out = mode == ADD ? *out + v : mode == ACTIVATE ? activate(v, act) : v;
                }
        }
    }
}

/* W, for gptforge.native's packing: the layout of the weights this build reads */
int gptforge_vector_width(void) { return W; }

/* One product, for native.gemv: y (rows x out) = x (rows x in) . w^T + b, w fp32 (scale NULL) or int8. */
void gptforge_gemv(const void *wp, const float *scale, const float *x, const float *b, float *y, long out,
                   long in, long rows) {
    Weight w = {wp, scale, b, out, in};
    product(&w, x, rows, y, out, STORE, 0);
}

typedef struct {
    const float *ln1_w, *ln1_b;
    Weight attn, attn_proj;
    const float *ln2_w, *ln2_b;
    Weight fc, mlp_proj;
    float *k, *v; /* the KV cache of this layer: (batch, heads, max_len, head_dim), contiguous */
} Layer;

typedef struct {
    long n_layer, n_head, n_embd, mlp_width, max_len;
    float eps;
    long act;
    const float *wte, *wpe, *lnf_w, *lnf_b;
    Weight head;
    const Layer *layers;
} Model;

/* y[r] = layer_norm(x[r]) for r < rows, rows `stride` apart, n live values each. */
static void layer_norm(const float *x, float *y, long rows, long n, long stride, const float *g, const float *b,
                       float eps) {
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * stride;
        float *yr = y + r * stride;
        float mean = 0.f, var = 0.f;
        for (long i = 0; i < n; i++)
            mean += xr[i];
        mean /= n;
        for (long i = 0; i < n; i++)
            var += (xr[i] - mean) * (xr[i] - mean);
        float inv = 1.f / sqrtf(var / n + eps);
        for (long i = 0; i < n; i++)
            yr[i] = (xr[i] - mean) * inv * g[i] + b[i];
    }
}

/* One query per row against the cache's positions 0..past (the new key and value are written at `past`
   first). visible (rows x (past + 1), or NULL for all): which cached positions a row may see (padding
   not); its own new position is always seen. qkv: rows x 3C; scores: rows x heads x (past + 1); y: rows x ys. */
static void attend(const Model *m, const Layer *L, const float *qkv, long rows, long past, const unsigned char *visible,
                   float *scores, float *y, long ys) {
    long H = m->n_head, C = m->n_embd, D = C / H, S = past + 1;
    float scale = 1.f / sqrtf((float)D);
#pragma omp parallel for schedule(static)
    for (long bh = 0; bh < rows * H; bh++) {
        long b = bh / H, h = bh % H;
        const float *q = qkv + b * 3 * C + h * D;
        float *K = L->k + (bh * m->max_len) * D, *V = L->v + (bh * m->max_len) * D;
        memcpy(K + past * D, q + C, D * sizeof(float));
        memcpy(V + past * D, q + 2 * C, D * sizeof(float));
        float *p = scores + bh * S, top = -INFINITY, sum = 0.f;
        for (long j = 0; j < S; j++) {
            if (visible && !visible[b * S + j] && j != past) {
                p[j] = -INFINITY;
                continue;
            }
            float s = 0.f;
            for (long d = 0; d < D; d++)
                s += q[d] * K[j * D + d];
            p[j] = s * scale;
            top = p[j] > top ? p[j] : top;
        }
        for (long j = 0; j < S; j++)
            sum += p[j] = p[j] == -INFINITY ? 0.f : expf(p[j] - top);
        float *out = y + b * ys + h * D;
        for (long d = 0; d < D; d++)
            out[d] = 0.f;
        for (long j = 0; j < S; j++) {
            float pj = p[j] / sum;
            if (pj != 0.f)
                for (long d = 0; d < D; d++)
                    out[d] += pj * V[j * D + d];
        }
    }
}

static long padded(long n) { return (n + W - 1) / W * W; }

/* One decoding step: token ids[r] at position pos[r] for each of `rows` sequences, `past` positions already
   cached; writes the new keys and values into the cache at `past` and the logits (rows x vocab). Returns 0,
   or -1 when out of memory. */
int gptforge_step(const Model *m, const long *ids, const long *pos, long rows, long past,
                  const unsigned char *visible, float *logits) {
    long C = m->n_embd, Cp = padded(C), Fp = padded(m->mlp_width);
    float *x = calloc(rows * Cp, sizeof(float)), *h = calloc(rows * Cp, sizeof(float));
    float *qkv = calloc(rows * 3 * C, sizeof(float)), *u = calloc(rows * Fp, sizeof(float));
    float *scores = malloc(rows * m->n_head * (past + 1) * sizeof(float));
    int status = 0;
    if (!x || !h || !qkv || !u || !scores) {
        status = -1;
        goto done;
    }
    for (long r = 0; r < rows; r++)
        for (long i = 0; i < C; i++)
            x[r * Cp + i] = m->wte[ids[r] * C + i] + m->wpe[pos[r] * C + i];
    for (long l = 0; l < m->n_layer; l++) {
        const Layer *L = m->layers + l;
        layer_norm(x, h, rows, C, Cp, L->ln1_w, L->ln1_b, m->eps);
        product(&L->attn, h, rows, qkv, 3 * C, STORE, 0);
        attend(m, L, qkv, rows, past, visible, scores, h, Cp);
        product(&L->attn_proj, h, rows, x, Cp, ADD, 0);
        layer_norm(x, h, rows, C, Cp, L->ln2_w, L->ln2_b, m->eps);
        product(&L->fc, h, rows, u, Fp, ACTIVATE, (int)m->act);
        product(&L->mlp_proj, u, rows, x, Cp, ADD, 0);
    }
    layer_norm(x, h, rows, C, Cp, m->lnf_w, m->lnf_b, m->eps);
    product(&m->head, h, rows, logits, m->head.out, STORE, 0);
done:
    free(x), free(h), free(qkv), free(u), free(scores);
    return status;
}
