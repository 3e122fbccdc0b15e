// float32 3 x 3, stride-1 convolutions by Winograd's algorithms -- the filter gradient by F(3 x 3, 2 x 2), the forward
// and the data gradient by F(2 x 2, 3 x 3) -- for the fp32 precision, where the products run on CUDA cores and these
// take 2.25x fewer of them than the direct sum (winograd.py plans them; conv.py measures them beside the other
// candidates; the GEMMs between the transforms are cuBLAS's, strided-batched).
//
// The filter gradient.
// dw[o][c][r][s] = sum over images and output pixels (p, q) of dy[o][p][q] x[c][p + r - pad][q + s - pad]. Cut dy
// into 2 x 2 tiles g (rows 2 ty, 2 ty + 1; zero past P, Q) and x into the 4 x 4 patches d they meet (rows 2 ty - pad
// .. 2 ty - pad + 3; zero outside the image): each tile adds the 3 x 3 correlation of d with g, which F(3, 2) gives in
// 16 products,
//     dw_tile = G^T [(A g A^T) (.) (B^T d B)] G,
// with B^T the input transform of F(2, 3), A (4 x 2) the transpose of F(2, 3)'s output transform and G^T (3 x 4) the
// transpose of its filter transform (the trilinear form of F(2, 3) with the output and the filter exchanged):
//     B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  A = [1 0; 1 1; 1 -1; 0 -1],
//     G^T = [1 1/2 1/2 0; 0 1/2 -1/2 0; 0 1/2 1/2 1].
// The sum over tiles t moves inside: dw = G^T M G with M[xi][o][c] = sum_t U[xi][o][t] V[xi][c][t] for the 16
// elements xi of the 4 x 4 transforms, U = A g A^T of dy's tiles and V = B^T d B of x's patches: 16 GEMMs (O x C, K =
// tiles), 4x fewer products than the 9 of the direct sum for every 4 pixels, at the price of writing U and V. Their
// outputs are small and their K long, so K is cut into parts (16 x parts GEMMs side by side) that wino_dw adds.
// The transforms only add, subtract and halve, exactly or within one rounding of the inputs' magnitude.

// One item of a transform: channel ch of tile (image, ty, tx) of a chunk, and where its 16 transformed elements go
// (element xi at at + xi * stride). A chunk's T tiles are cut into `parts` runs of L = ceil(T / parts) (the filter
// gradient's GEMMs, split along their K), laid out [parts][16][channels][L]: tile t = (image TH + ty) TW + tx is
// element t % L of part t / L. wino_each calls f on every (ch, tile), consecutive threads along a part's slots, in a
// grid-stride loop, and writes zeros to `out`'s 16 elements of each slot of the last part past T, so that every part
// is a whole K of L (out: the transform's output; unused in one part).
struct WinoItem {
    int ch, image, ty, tx;
    long long at, stride;
};

template <class F>
__device__ __forceinline__ void wino_each(int tiles, int parts, int channels, int TH, int TW, float* out,
                                          const F& f) {
    const int L = (tiles + parts - 1) / parts;
    const long long count = static_cast<long long>(channels) * parts * L;
    for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < count;
         e += static_cast<long long>(gridDim.x) * blockDim.x) {
        const long long sc = e / L;                       // (part, channel)
        const int slot = static_cast<int>(e - sc * L), part = static_cast<int>(sc / channels);
        const int ch = static_cast<int>(sc - static_cast<long long>(part) * channels), t = part * L + slot;
        const long long stride = static_cast<long long>(channels) * L;
        const long long at = part * 16 * stride + static_cast<long long>(ch) * L + slot;
        if (t >= tiles) {
#pragma unroll
            for (int xi = 0; xi < 16; ++xi) out[at + xi * stride] = 0.f;
            continue;
        }
        f(WinoItem{ch, t / (TH * TW), (t / TW) % TH, t % TW, at, stride});
    }
}

// x [n][C][H][W] float32 -> v [parts][16][C][L] (wino_each) for images n0 .. n0 + nb - 1, T = nb TH TW tiles: B^T d
// B of each tile's 4 x 4 patch d.
extern "C" __global__ void wino_x(const float* __restrict__ x, float* __restrict__ v, int n0, int nb, int C, int H,
                                  int W, int pad, int TH, int TW, int parts) {
    wino_each(nb * TH * TW, parts, C, TH, TW, v, [&](const WinoItem& it) {
        const int c = it.ch, ty = it.ty, tx = it.tx;
        const float* plane = x + (static_cast<long long>(n0 + it.image) * C + c) * H * W;
        float d[4][4];
#pragma unroll
        for (int a = 0; a < 4; ++a) {
            const int ih = 2 * ty - pad + a;
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const int iw = 2 * tx - pad + b;
                d[a][b] = ih >= 0 && ih < H && iw >= 0 && iw < W ? plane[ih * W + iw] : 0.f;
            }
        }
        float e4[4][4];                                   // B^T d: each column
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            e4[0][b] = d[0][b] - d[2][b];
            e4[1][b] = d[1][b] + d[2][b];
            e4[2][b] = d[2][b] - d[1][b];
            e4[3][b] = d[1][b] - d[3][b];
        }
#pragma unroll
        for (int a = 0; a < 4; ++a) {                     // (B^T d) B: each row
            const float r[4] = {e4[a][0] - e4[a][2], e4[a][1] + e4[a][2], e4[a][2] - e4[a][1], e4[a][1] - e4[a][3]};
#pragma unroll
            for (int b = 0; b < 4; ++b) v[it.at + (4 * a + b) * it.stride] = r[b];
        }
    });
}

// dy [n][O][P][Q] float32 -> u [parts][16][O][L] for the same images and tiles as wino_x (TH = ceil(P / 2), TW =
// ceil(Q / 2)): A g A^T of each 2 x 2 tile g.
extern "C" __global__ void wino_dy(const float* __restrict__ dy, float* __restrict__ u, int n0, int nb, int O, int P,
                                   int Q, int TH, int TW, int parts) {
    wino_each(nb * TH * TW, parts, O, TH, TW, u, [&](const WinoItem& it) {
        const int o = it.ch, ty = it.ty, tx = it.tx;
        const float* plane = dy + (static_cast<long long>(n0 + it.image) * O + o) * P * Q;
        float g[2][2];
#pragma unroll
        for (int a = 0; a < 2; ++a)
#pragma unroll
            for (int b = 0; b < 2; ++b) {
                const int p = 2 * ty + a, q = 2 * tx + b;
                g[a][b] = p < P && q < Q ? plane[p * Q + q] : 0.f;
            }
        const float e4[4][2] = {{g[0][0], g[0][1]},                       // A g: each column
                                {g[0][0] + g[1][0], g[0][1] + g[1][1]},
                                {g[0][0] - g[1][0], g[0][1] - g[1][1]},
                                {-g[1][0], -g[1][1]}};
#pragma unroll
        for (int a = 0; a < 4; ++a) {                                     // (A g) A^T: each row
            const float r[4] = {e4[a][0], e4[a][0] + e4[a][1], e4[a][0] - e4[a][1], -e4[a][1]};
#pragma unroll
            for (int b = 0; b < 4; ++b) u[it.at + (4 * a + b) * it.stride] = r[b];
        }
    });
}

// m [parts][16][O][C] (the GEMMs' sums of each part of K) -> dw [O][C][3][3] = G^T M G with M the sum of the parts
// (in part order), added into dw where add != 0; one thread an (o, c).
extern "C" __global__ void wino_dw(const float* __restrict__ m, float* __restrict__ dw, int O, int C, int parts,
                                   int add) {
    const long long OC = static_cast<long long>(O) * C;
    for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < OC;
         e += static_cast<long long>(gridDim.x) * blockDim.x) {
        float w[4][4];
#pragma unroll
        for (int xi = 0; xi < 16; ++xi) {
            float sum = 0.f;
            for (int part = 0; part < parts; ++part) sum += m[(part * 16 + xi) * OC + e];
            w[xi / 4][xi % 4] = sum;
        }
        float e3[3][4];                                   // G^T M: each column
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            e3[0][b] = w[0][b] + 0.5f * (w[1][b] + w[2][b]);
            e3[1][b] = 0.5f * (w[1][b] - w[2][b]);
            e3[2][b] = 0.5f * (w[1][b] + w[2][b]) + w[3][b];
        }
        float* out = dw + e * 9;
#pragma unroll
        for (int a = 0; a < 3; ++a) {                     // (G^T M) G: each row
            const float r[3] = {e3[a][0] + 0.5f * (e3[a][1] + e3[a][2]), 0.5f * (e3[a][1] - e3[a][2]),
                                0.5f * (e3[a][1] + e3[a][2]) + e3[a][3]};
#pragma unroll
            for (int b = 0; b < 3; ++b) out[3 * a + b] = (add ? out[3 * a + b] : 0.f) + r[b];
        }
    }
}

// The forward, F(2 x 2, 3 x 3): y[o] (2 x 2 tile) = A^T [sum over c of (G w[o][c] G^T) (.) (B^T d[c] B)] A, with d the
// 4 x 4 patch of x the tile reads (wino_x's V in one part, the same tiles: y's P x Q in 2 x 2 tiles, patches from
// row 2 ty - pad) and F(2, 3)'s matrices,
//     G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],  A^T = [1 1 1 0; 0 1 -1 -1].
// The sum over c is 16 GEMMs, M[xi] = U[xi] V[xi] (OUT x IN times IN x T). The data gradient of a stride-1 conv is the
// forward of dy with the weights turned (w'[c][o][r][s] = w[o][c][2 - r][2 - s]) at padding 2 - pad.

// w -> u [16][OUT][IN] = G g G^T of each 3 x 3 filter g: w [OUT][IN][3][3] as it is, or (turn) w [IN][OUT][3][3]
// turned; one thread an (out, in).
extern "C" __global__ void wino_w(const float* __restrict__ w, float* __restrict__ u, int OUT, int IN, int turn) {
    const long long count = static_cast<long long>(OUT) * IN;
    for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < count;
         e += static_cast<long long>(gridDim.x) * blockDim.x) {
        const int a = static_cast<int>(e / IN), b = static_cast<int>(e - static_cast<long long>(a) * IN);
        float g[3][3];
#pragma unroll
        for (int r = 0; r < 3; ++r)
#pragma unroll
            for (int s = 0; s < 3; ++s)
                g[r][s] = turn ? w[(static_cast<long long>(b) * OUT + a) * 9 + (2 - r) * 3 + (2 - s)]
                               : w[e * 9 + r * 3 + s];
        float e4[4][3];                                   // G g: each column
#pragma unroll
        for (int s = 0; s < 3; ++s) {
            e4[0][s] = g[0][s];
            e4[1][s] = 0.5f * (g[0][s] + g[1][s] + g[2][s]);
            e4[2][s] = 0.5f * (g[0][s] - g[1][s] + g[2][s]);
            e4[3][s] = g[2][s];
        }
#pragma unroll
        for (int r = 0; r < 4; ++r) {                     // (G g) G^T: each row
            const float q[4] = {e4[r][0], 0.5f * (e4[r][0] + e4[r][1] + e4[r][2]),
                                0.5f * (e4[r][0] - e4[r][1] + e4[r][2]), e4[r][2]};
#pragma unroll
            for (int c = 0; c < 4; ++c) u[(4 * r + c) * count + e] = q[c];
        }
    }
}

// m [16][OUT][T] (the GEMMs' sums of a chunk: wino_each's layout in one part) -> y [n][OUT][P][Q] = A^T M A of each
// tile of images n0 .. n0 + nb - 1, + bias[o] (unless null), ReLU where act == 1, times (relu_x > 0) where relu_x is
// given (the data gradient's mask, [n][OUT][P][Q]); the tiles' pixels past P or Q are not written.
extern "C" __global__ void wino_y(const float* __restrict__ m, const float* __restrict__ bias,
                                  const float* __restrict__ relu_x, float* __restrict__ y, int n0, int nb, int OUT,
                                  int P, int Q, int TH, int TW, int act) {
    wino_each(nb * TH * TW, 1, OUT, TH, TW, nullptr, [&](const WinoItem& it) {
        float w[4][4];
#pragma unroll
        for (int xi = 0; xi < 16; ++xi) w[xi / 4][xi % 4] = m[it.at + xi * it.stride];
        float e2[2][4];                                   // A^T M: each column
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            e2[0][b] = w[0][b] + w[1][b] + w[2][b];
            e2[1][b] = w[1][b] - w[2][b] - w[3][b];
        }
        const long long plane = (static_cast<long long>(n0 + it.image) * OUT + it.ch) * P * Q;
        const float add = bias ? bias[it.ch] : 0.f;
#pragma unroll
        for (int a = 0; a < 2; ++a) {                     // (A^T M) A: each row
            const float r[2] = {e2[a][0] + e2[a][1] + e2[a][2], e2[a][1] - e2[a][2] - e2[a][3]};
            const int p = 2 * it.ty + a;
#pragma unroll
            for (int b = 0; b < 2; ++b) {
                const int q = 2 * it.tx + b;
                if (p >= P || q >= Q) continue;
                const long long o = plane + p * Q + q;
                float z = r[b] + add;
                if (act == 1) z = z > 0.f ? z : 0.f;
                if (relu_x && !(relu_x[o] > 0.f)) z = 0.f;
                y[o] = z;
            }
        }
    });
}
