// Optimiser updates over one flat buffer of all parameters, one launch per step (torch.optim semantics).
// Hyperparameters that change every step (learning rate, first-step flag, Adam's bias corrections) are read from
// device memory `hp` when it is given, so a captured CUDA graph sees the schedule's current values:
//   hp[0] = lr, hp[1] = first step (1/0), hp[2] = lr / (1 - beta1^t), hp[3] = 1 / (1 - beta2^t)
#include "common.cuh"

// d = g + wd*p; buf = d (first step) or momentum*buf + (1-dampening)*d; d = d + momentum*buf (nesterov) or buf;
// p -= lr * d
extern "C" __global__ void sgd_update(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buf,
                                      const float* __restrict__ hp, float lr, int first, float momentum,
                                      float dampening, float wd, int nesterov, long long n) {
    if (hp) {
        lr = hp[0];
        first = hp[1] != 0.f;
    }
    HN_GRID_STRIDE(i, n) {
        float d = g[i];
        if (wd != 0.f) d += wd * p[i];
        if (buf) {
            float b;
            if (first) {
                b = d;
            } else {
                b = momentum * buf[i];
                b += dampening != 0.f ? (1.f - dampening) * d : d;
            }
            buf[i] = b;
            d = nesterov ? d + momentum * b : b;
        }
        p[i] -= lr * d;
    }
}

// Adam (decoupled = 0: d = g + wd*p) / AdamW (decoupled = 1: p *= 1 - lr*wd):
// m = b1*m + (1-b1)*d; v = b2*v + (1-b2)*d*d; p -= step_size * m / (sqrt(v * inv_bc2) + eps)
extern "C" __global__ void adam_update(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                                       float* __restrict__ v, const float* __restrict__ hp, float lr,
                                       float step_size, float inv_bc2, float beta1, float beta2, float eps, float wd,
                                       int decoupled, long long n) {
    if (hp) {
        lr = hp[0];
        step_size = hp[2];
        inv_bc2 = hp[3];
    }
    const float decay = 1.f - lr * wd;
    HN_GRID_STRIDE(i, n) {
        float pi = p[i], d = g[i];
        if (wd != 0.f) {
            if (decoupled) pi *= decay;
            else d += wd * pi;
        }
        const float mi = beta1 * m[i] + (1.f - beta1) * d;
        const float vi = beta2 * v[i] + (1.f - beta2) * (d * d);
        m[i] = mi;
        v[i] = vi;
        p[i] = pi - step_size * (mi / (sqrtf(vi * inv_bc2) + eps));
    }
}

// hetnet.train.Lookahead's move toward the weights, then their reset to it: ema += w * (live - ema); live = ema. The
// three roundings of the array expression it replaces (subtract, multiply, add: no fused multiply-add), so the
// cuda backend's lookahead gives the bits of the other backends'.
extern "C" __global__ void lookahead_update(float* __restrict__ live, float* __restrict__ ema, float w, long long n) {
    HN_GRID_STRIDE(i, n) {
        const float e = __fadd_rn(ema[i], __fmul_rn(w, __fsub_rn(live[i], ema[i])));
        ema[i] = e;
        live[i] = e;
    }
}
