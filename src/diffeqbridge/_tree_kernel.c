/* Fused descent of diffeqbridge's VirtualBrownianTree on the CPU (see _tree_kernel.py).
 *
 * One call answers a query (W(t), J(t)) for every (sample, element): per element the level
 * recursion (hash, Box-Muller normal pair, midpoint-split update) runs in registers; no
 * (B, depth, N) intermediates.  The float64 operations are those of _tree_kernel.py's
 * level_update / bridge / standard_normal_pair in the same order (compiled with
 * -ffp-contract=off, so no fused multiply-adds either); log/sin/cos come from glibc's libm
 * (vectorised variants from libmvec where the compiler vectorises), the eager path's from
 * torch (SLEEF), so the two paths agree up to the last bits of those functions.  The hash is
 * plain uint32 arithmetic and bit-identical to the eager int32/int64 tensor code.
 *
 * Elements are processed in blocks, level-major inside a block, so that the loop over the
 * block's elements is a simple vectorisable loop.
 *
 * Per-sample reuse (optional: prev and cache non-NULL): the tree remembers each element's
 * previous finest cell and its four running sums after every level.  The levels above the
 * deepest common ancestor of the previous and the new cell (same node, same child) give the
 * same sums, so a block starts at the shallowest level where one of its lanes leaves its
 * previous path, from the cached sums: the same operations on the same values as a full
 * descent, hence the same bits.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#ifdef TREE_LIBMVEC /* glibc's vector math (libmvec) for the vectorised loops */
__attribute__((__simd__("notinbranch"))) extern double log(double);
__attribute__((__simd__("notinbranch"))) extern double sin(double);
__attribute__((__simd__("notinbranch"))) extern double cos(double);
#endif

#define BLOCK 8       /* lanes per block of tree_point: one AVX-512 vector of doubles */
#define GRID_BLOCK 16 /* lanes per block of tree_grid (all share a time: no reuse lost to wider blocks) */
#define PHI32 0x9E3779B1u
#define TWO_PI 6.283185307179586

static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

/* node * phi + level_key (mod 2^32), with node >> 32 absorbed for trees deeper than 32 (wide:
 * wide_mask all ones; 0 otherwise) -- as a mask, so that it needs no branch in a vectorised loop */
static inline uint32_t node_key_masked(uint64_t node, uint32_t level_key, uint32_t wide_mask) {
    const uint32_t narrow = (uint32_t)node * PHI32 + level_key;
    return narrow ^ ((narrow ^ fmix32((narrow ^ (uint32_t)(node >> 32)) + 0x9E3779B9u)) & wide_mask);
}

static inline uint32_t node_key(uint64_t node, uint32_t level_key, int wide) {
    return node_key_masked(node, level_key, wide ? 0xFFFFFFFFu : 0u);
}

static inline double unit(uint32_t word) {
    return ((double)(int32_t)word + 2147483648.5) * 2.3283064365386963e-10; /* 2^-32 */
}

/* The finest cell of time tt and the fraction of it, as _tree_kernel.locate computes them. */
/* A standard normal pair (Box–Muller) from a lane's two keys hashed with a node's key. */
static inline void normal_pair(uint32_t k0, uint32_t k1, uint32_t node, double *z, double *x) {
    const double u1 = unit(fmix32(k0 ^ node)), u2 = unit(fmix32(k1 ^ node));
    const double radius = sqrt(-2.0 * log(u1));
    const double angle = TWO_PI * u2;
    *z = radius * cos(angle);
    *x = radius * sin(angle);
}

/* One level of one lane's descent: the level's constants lv, the child entered (right: 0 or
 * 1), the level's normal pair (zn, xn) and the root's (wr, hr) update the running sums
 * c_h, c_w, c_l, c_j and give the (W, H) of the child cell (docs/brownian.md). */
static inline void level_update(const double *lv, double right, double zn, double xn, double wr, double hr, double *c_h,
                                double *c_w, double *c_l, double *c_j, double *w_cell, double *h_cell) {
    const double sq16 = lv[0], sq48 = lv[1], four_pow4 = lv[2], inv_pow4 = lv[3];
    const double two_pow2 = lv[4], inv_pow2 = lv[5], half_width = lv[6];
    const double z = zn * sq16, x = xn * sq48;
    const double sign = 1.0 - 2.0 * right;
    const double h_inc = four_pow4 * (-0.5 * z + sign * x);
    *c_h = *c_h + h_inc;
    const double levy = (hr + (*c_h - h_inc)) * inv_pow4;
    const double w_inc = two_pow2 * sign * (1.5 * levy + z);
    *c_w = *c_w + w_inc;
    const double w_node = (wr + (*c_w - w_inc)) * inv_pow2;
    const double w_left = 0.5 * w_node + 1.5 * levy + z;
    const double h_left = 0.25 * levy - 0.5 * z + x;
    const double left = right * w_left;
    *c_l = *c_l + left;
    *c_j = *c_j + right * half_width * ((*c_l - left) + h_left + 0.5 * w_left);
    *w_cell = 0.5 * w_node + sign * (1.5 * levy + z);
    *h_cell = 0.25 * levy - 0.5 * z + sign * x;
}

/* Stores a block's running sums after level `level` in its (depth, 4, width) cache rows. */
static inline void store(int64_t width, double *cache, int64_t level, const double *c_h, const double *c_w, const double *c_l,
                         const double *c_j) {
    double *row = cache + level * width * 4;
    for (int64_t j = 0; j < width; j++) {
        row[j] = c_h[j];
        row[width + j] = c_w[j];
        row[2 * width + j] = c_l[j];
        row[3 * width + j] = c_j[j];
    }
}

static inline void locate(double tt, double t0, double length, double n_cells, uint64_t *cell, double *frac) {
    double position = (tt - t0) / length;
    position = position < 0.0 ? 0.0 : (position > 1.0 ? 1.0 : position);
    position = position * n_cells;
    double c = floor(position);
    c = c < n_cells - 1.0 ? c : n_cells - 1.0;
    *cell = (uint64_t)c;
    *frac = position - c;
}

/* Levels first..depth-1 of one block's descent (level_update), from the running sums
 * c_h, c_w, c_l, c_j after level first-1 (zeros for first = 0).  Leaves the (W, H) of the
 * finest cell entered in w_cell, h_cell; with cache non-NULL, the sums after every level are
 * stored in the block's (depth, 4, BLOCK) rows. */
static inline void descend(int64_t width, int64_t first, int64_t depth, const double *levels, const int64_t *level_keys, int wide,
                           const uint64_t *cell, const uint32_t *k0, const uint32_t *k1, const double *wr,
                           const double *hr, double *c_h, double *c_w, double *c_l, double *c_j, double *w_cell,
                           double *h_cell, double *cache) {
    /* two passes: the normal pairs of every level first (independent vector log/sin/cos,
     * overlapping freely), then the recursion, which is a chain through the levels */
    double zn[64][BLOCK], xn[64][BLOCK];
    const uint32_t wide_mask = wide ? 0xFFFFFFFFu : 0u;
    for (int64_t k = first; k < depth; k++) {
        const uint32_t level_key = (uint32_t)level_keys[k];
        const int shift = (int)(depth - k);
        /* the node's key computed in vector registers (separate scalar stores of it, read back
         * as vectors, stalled store forwarding) */
#pragma omp simd
        for (int64_t j = 0; j < width; j++) {
            normal_pair(k0[j], k1[j], node_key_masked(cell[j] >> shift, level_key, wide_mask), &zn[k][j], &xn[k][j]);
        }
    }
    for (int64_t k = first; k < depth; k++) {
        const double *lv = levels + 7 * k;
        const int shift = (int)(depth - k);
#pragma omp simd
        for (int64_t j = 0; j < width; j++) {
            const double right = (double)(int32_t)((uint32_t)(cell[j] >> (shift - 1)) & 1u);
            level_update(lv, right, zn[k][j], xn[k][j], wr[j], hr[j], &c_h[j], &c_w[j], &c_l[j], &c_j[j], &w_cell[j], &h_cell[j]);
        }
        if (cache != NULL) store(width, cache, k, c_h, c_w, c_l, c_j);
    }
}

/* Running sums of a block after level `level` from its (depth, 4, width) cache rows. */
static inline void restore(int64_t width, const double *cache, int64_t level, double *c_h, double *c_w, double *c_l, double *c_j) {
    const double *row = cache + level * width * 4;
    for (int64_t j = 0; j < width; j++) {
        c_h[j] = row[j];
        c_w[j] = row[width + j];
        c_l[j] = row[2 * width + j];
        c_j[j] = row[3 * width + j];
    }
}

/* (W, J) at fraction frac[j] of the finest cell entered, for one block, from the cell's
 * (w_cell, h_cell), the running sums c_l, c_j and the in-cell normal pair (z1, z2): only
 * correctly rounded operations (sqrt, +, *, /), which give the same bits vectorised or not. */
static inline void bridge(int64_t width, const double *frac, double w, double w2, double w3, const double *z1,
                          const double *z2, const double *w_cell, const double *h_cell, const double *c_l,
                          const double *c_j, double *w_res, double *j_res) {
    for (int64_t j = 0; j < width; j++) {
        const double r = frac[j] * w;
        const double q = w - r, r2 = r * r, rw = r / w;
        const double mean_w = rw * w_cell[j] + (6.0 * q * r / w2) * h_cell[j];
        const double mean_h = (rw * rw) * h_cell[j];
        double var_w = r - r2 / w - 3.0 * (q * q) * r2 / w3;
        var_w = var_w < 0.0 ? 0.0 : var_w;
        double var_h = r / 12.0 - (r2 * r2) / (12.0 * w3);
        var_h = var_h < 0.0 ? 0.0 : var_h;
        const double cov = -q * (r2 * r) / (2.0 * w3);
        const double l11 = sqrt(var_w);
        const double l21 = l11 > 0.0 ? cov / l11 : 0.0;
        double v22 = var_h - l21 * l21;
        v22 = v22 < 0.0 ? 0.0 : v22;
        const double l22 = sqrt(v22);
        const double w_part = mean_w + l11 * z1[j];
        const double h_part = mean_h + l21 * z1[j] + l22 * z2[j];
        w_res[j] = c_l[j] + w_part;
        j_res[j] = c_j[j] + r * c_l[j] + r * (h_part + 0.5 * w_part);
    }
}

/* The point inside the finest cell and (W(t), J(t)) of one block.  The normal pair is drawn
 * in its own loop, free of selects, so that it is vectorised like the levels' (every lane
 * takes the same vector log/sin/cos), then bridge(). */
static inline void finish(int64_t width, const uint64_t *cell, const double *frac, uint32_t cell_key, int wide, const uint32_t *k0,
                          const uint32_t *k1, double w, double w2, double w3, const double *w_cell, const double *h_cell,
                          const double *c_l, const double *c_j, double *w_res, double *j_res) {
    double z1[GRID_BLOCK], z2[GRID_BLOCK];
    const uint32_t wide_mask = wide ? 0xFFFFFFFFu : 0u;
#pragma omp simd
    for (int64_t j = 0; j < width; j++) {
        normal_pair(k0[j], k1[j], node_key_masked(cell[j], cell_key, wide_mask), &z1[j], &z2[j]);
    }
    bridge(width, frac, w, w2, w3, z1, z2, w_cell, h_cell, c_l, c_j, w_res, j_res);
}

/* A block's lanes: element keys and root increments (lanes past the end of the data repeat
 * element `start`: every lane runs the same instructions, see tree_point). */
static inline void load_block(int64_t width, int64_t start, int64_t m, const int32_t *key0, const int32_t *key1, const double *w_root,
                              const double *h_root, uint32_t *k0, uint32_t *k1, double *wr, double *hr) {
    for (int64_t j = 0; j < width; j++) {
        const int64_t e = start + (j < m ? j : 0);
        k0[j] = (uint32_t)key0[e];
        k1[j] = (uint32_t)key1[e];
        wr[j] = w_root[e];
        hr[j] = h_root[e];
    }
}

/* levels: depth rows of (sq16, sq48, four_pow4, 1/pow4, two_pow2, 1/pow2, half_width);
 * geometry: (t0, length, n_cells, w, w^2, w^3); element e = b * n + i uses t[b]. */
void tree_point(int64_t count, int64_t n, const double *t, const int32_t *key0, const int32_t *key1,
                const double *w_root, const double *h_root, const double *levels, const int64_t *level_keys,
                int64_t depth, const double *geometry, int64_t cell_key, int64_t wide,
                double *w_out, double *j_out, uint64_t *prev, double *cache, int64_t cache_valid) {
    const double t0 = geometry[0], length = geometry[1], n_cells = geometry[2];
    const double w = geometry[3], w2 = geometry[4], w3 = geometry[5];
    for (int64_t start = 0; start < count; start += BLOCK) {
        /* Every loop below runs over the whole block (BLOCK lanes, a multiple of every SIMD
         * width), the lanes past the end of the data on copies of its first element: each
         * element takes the same instructions wherever it sits in the batch (no scalar
         * remainder loop, whose log/sin/cos would round differently), so batch composition
         * cannot change a value. */
        const int64_t m = count - start < BLOCK ? count - start : BLOCK;
        uint64_t cell[BLOCK];
        double frac[BLOCK], wr[BLOCK], hr[BLOCK], c_h[BLOCK], c_w[BLOCK], c_l[BLOCK], c_j[BLOCK];
        double w_cell[BLOCK], h_cell[BLOCK], w_res[BLOCK], j_res[BLOCK];
        uint32_t k0[BLOCK], k1[BLOCK];
        for (int64_t j = 0; j < BLOCK; j++) {
            locate(t[(start + (j < m ? j : 0)) / n], t0, length, n_cells, &cell[j], &frac[j]);
            c_h[j] = c_w[j] = c_l[j] = c_j[j] = 0.0;
        }
        load_block(BLOCK, start, m, key0, key1, w_root, h_root, k0, k1, wr, hr);
        double *rows = cache != NULL ? cache + start * depth * 4 : NULL; /* (block, level, 4, lane) */
        int64_t first = 0; /* the shallowest level a lane of this block must redraw */
        if (cache != NULL && cache_valid) {
            first = depth - 1; /* the deepest level is always redrawn: it gives the cell's (W, H) */
            for (int64_t j = 0; j < m; j++) {
                const uint64_t diff = cell[j] ^ prev[start + j];
                const int64_t shared = diff == 0 ? depth : depth - (64 - __builtin_clzll(diff));
                first = shared < first ? shared : first;
            }
            if (first > 0) restore(BLOCK, rows, first - 1, c_h, c_w, c_l, c_j);
        }
        descend(BLOCK, first, depth, levels, level_keys, (int)wide, cell, k0, k1, wr, hr, c_h, c_w, c_l, c_j, w_cell, h_cell,
                rows);
        if (prev != NULL)
            for (int64_t j = 0; j < m; j++) prev[start + j] = cell[j];
        finish(BLOCK, cell, frac, (uint32_t)cell_key, (int)wide, k0, k1, w, w2, w3, w_cell, h_cell, c_l, c_j, w_res, j_res);
        for (int64_t j = 0; j < m; j++) {
            w_out[start + j] = w_res[j];
            j_out[start + j] = j_res[j];
        }
    }
}

/* tree_point at n_times times shared by the whole batch (times[k]; any order): w_out and
 * j_out are (n_times, count), j_out may be NULL (W only).  Per block, each time starts from
 * the sums the previous time left at the levels above their deepest common ancestor (kept in
 * `scratch`, (depth, 4, GRID_BLOCK) doubles), as tree_point's per-sample reuse does.  The
 * times are taken in chunks: the normal pairs of every node a chunk redraws (and of its
 * in-cell points) are drawn first, in one loop of independent vector log/sin/cos (their keys
 * are shared by the lanes: every lane is at the same time), then the recursion and the
 * bridges run on them.  The same operations on the same values as tree_point, hence the same
 * bits. */
#define GRID_CHUNK 96 /* normal pairs per chunk (a time needs at most depth + 1 <= 53); 24 KiB of normals */
void tree_grid(int64_t count, int64_t n_times, const double *times, const int32_t *key0, const int32_t *key1,
               const double *w_root, const double *h_root, const double *levels, const int64_t *level_keys,
               int64_t depth, const double *geometry, int64_t cell_key, int64_t wide, double *w_out, double *j_out,
               double *scratch) {
    const double t0 = geometry[0], length = geometry[1], n_cells = geometry[2];
    const double w = geometry[3], w2 = geometry[4], w3 = geometry[5];
    double zn[GRID_CHUNK][GRID_BLOCK], xn[GRID_CHUNK][GRID_BLOCK];
    for (int64_t start = 0; start < count; start += GRID_BLOCK) {
        const int64_t m = count - start < GRID_BLOCK ? count - start : GRID_BLOCK;
        double wr[GRID_BLOCK], hr[GRID_BLOCK], c_h[GRID_BLOCK], c_w[GRID_BLOCK], c_l[GRID_BLOCK], c_j[GRID_BLOCK];
        double frac[GRID_BLOCK], w_cell[GRID_BLOCK], h_cell[GRID_BLOCK], w_res[GRID_BLOCK], j_res[GRID_BLOCK];
        uint32_t k0[GRID_BLOCK], k1[GRID_BLOCK];
        load_block(GRID_BLOCK, start, m, key0, key1, w_root, h_root, k0, k1, wr, hr);
        uint64_t last = 0;
        for (int64_t k = 0; k < n_times;) {
            /* the chunk: times k..k_end-1, their cells, fractions, first redrawn levels, and the
             * keys of the nodes (then the in-cell point) each redraws, in order */
            uint32_t key[GRID_CHUNK];
            uint64_t cells[GRID_CHUNK];
            double fracs[GRID_CHUNK];
            int64_t firsts[GRID_CHUNK], k_end = k, n_draws = 0;
            uint64_t prev = last;
            while (k_end < n_times) {
                uint64_t c;
                double f;
                locate(times[k_end], t0, length, n_cells, &c, &f);
                const uint64_t diff = c ^ prev;
                const int64_t first = k_end == 0 ? 0 : (diff == 0 ? depth - 1 : depth - (64 - __builtin_clzll(diff)));
                if (n_draws + (depth - first) + 1 > GRID_CHUNK) break;
                const int64_t i = k_end - k;
                cells[i] = c;
                fracs[i] = f;
                firsts[i] = first;
                for (int64_t lev = first; lev < depth; lev++)
                    key[n_draws++] = node_key(c >> (depth - lev), (uint32_t)level_keys[lev], (int)wide);
                key[n_draws++] = node_key(c, (uint32_t)cell_key, (int)wide);
                prev = c;
                k_end++;
            }
            for (int64_t d = 0; d < n_draws; d++) {
                const uint32_t node = key[d];
#pragma omp simd
                for (int64_t j = 0; j < GRID_BLOCK; j++) {
                    normal_pair(k0[j], k1[j], node, &zn[d][j], &xn[d][j]);
                }
            }
            int64_t d = 0;
            for (int64_t kk = k; kk < k_end; kk++) {
                const int64_t i = kk - k, first = firsts[i];
                const uint64_t c = cells[i];
                if (first > 0)
                    restore(GRID_BLOCK, scratch, first - 1, c_h, c_w, c_l, c_j);
                else
                    for (int64_t j = 0; j < GRID_BLOCK; j++) c_h[j] = c_w[j] = c_l[j] = c_j[j] = 0.0;
                for (int64_t lev = first; lev < depth; lev++, d++) {
                    const double *lv = levels + 7 * lev;
                    const double right = (double)(int32_t)((uint32_t)(c >> (depth - lev - 1)) & 1u);
                    for (int64_t j = 0; j < GRID_BLOCK; j++)
                        level_update(lv, right, zn[d][j], xn[d][j], wr[j], hr[j], &c_h[j], &c_w[j], &c_l[j], &c_j[j], &w_cell[j],
                                     &h_cell[j]);
                    store(GRID_BLOCK, scratch, lev, c_h, c_w, c_l, c_j);
                }
                for (int64_t j = 0; j < GRID_BLOCK; j++) frac[j] = fracs[i];
                bridge(GRID_BLOCK, frac, w, w2, w3, zn[d], xn[d], w_cell, h_cell, c_l, c_j, w_res, j_res);
                d++;
                for (int64_t j = 0; j < m; j++) w_out[kk * count + start + j] = w_res[j];
                if (j_out != NULL)
                    for (int64_t j = 0; j < m; j++) j_out[kk * count + start + j] = j_res[j];
            }
            last = cells[k_end - k - 1];
            k = k_end;
        }
    }
}

/* (dW, H) over [s, t] from two query results (W, J), per element: the operations of
 * VirtualBrownianTree.increment_from.  H = (J(t) - J(s)) / h - W(s) - dW / 2, h = t - s. */
void tree_increment(int64_t count, int64_t n, double t0, double t1, const double *s, const double *t,
                    const double *w_s, const double *j_s, const double *w_t, const double *j_t,
                    double *dw_out, double *h_out) {
    for (int64_t e = 0; e < count; e++) {
        double lo = s[e / n], hi = t[e / n];
        lo = lo < t0 ? t0 : (lo > t1 ? t1 : lo);
        hi = hi < t0 ? t0 : (hi > t1 ? t1 : hi);
        const double h = hi - lo;
        const double dw = w_t[e] - w_s[e];
        dw_out[e] = dw;
        h_out[e] = h != 0.0 ? (j_t[e] - j_s[e]) / h - w_s[e] - 0.5 * dw : 0.0;
    }
}
