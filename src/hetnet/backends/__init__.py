"""Backends: how each op is done on one kind of device. Layers call these; they never import NumPy-vs-CuPy logic.

A backend is a module (`reference`, `cpu`) or an object (`cuda.CudaBackend(device_id)`) exposing the attributes below.
`hetnet.device.get_backend(name)` is the one place that chooses it. Every backend computes the same functions; the
float64 `reference` backend is the oracle the others are tested against.

Shape legend: N batch, C input channels, K output channels (filters), H/W input height/width, P/Q output height/width,
R/S kernel height/width, F features. Activations are NCHW (or NF for dense layers), C-contiguous.

Attributes
----------
name: str                       "reference" | "cpu" | "cuda:N"
dtype: numpy dtype              float64 (reference) or float32 (cpu, cuda)
xp: module                      numpy or cupy, for the few array ops layers need (zeros_like, views)

Conversions and allocation
--------------------------
asarray(a) -> arr               copy a NumPy array (any dtype) to the device in the backend's dtype
to_numpy(arr) -> np.ndarray     copy back to host (float dtype kept)
zeros(shape) -> arr             zero array of the backend's dtype
labels(a) -> arr                int labels to the device (int64 on NumPy backends, int32 on cuda)
synchronize() -> None           wait for queued device work (no-op on CPU)
upload(a) -> arr                copy a NumPy array to the device keeping its dtype (uint8 images, int32 plans)

Data-set batches (hetnet.data.ResidentLoader)
---------------------------------------------
resident_data: bool             True where training should keep the uint8 data set on the device (cuda)
gather_images(images[N,C,H,W] uint8, labels[N], plan[4,M] int32, start, count, scale[C] f32, shift[C] f32)
    -> x[count,C,H,W] (backend dtype), y[count]
    columns start..start+count of the plan (rows: index, oy, ox, flip): pixel (i, j) of example m is
    v = images[idx, c, i + oy, jj + ox] with jj = W-1-j if flip else j, 0 outside the image, then
    x = float32(float32(v * scale[c]) + shift[c]) (two roundings, no fused multiply-add), exactly what
    hetnet.data.BatchLoader serves for the same plan.

Training-step hooks (optional; hetnet.train uses them when present)
--------------------------------------------------------------------
make_train_step(model, optimizer, schedule, label_smoothing) / make_eval_step(model) -> step object (see
    hetnet.train). cuda: a fused plan captured as a CUDA graph (cuda/step.py, with ops such as
    bn_relu_maxpool_forward/backward); cpu: the model with each Conv2D -> ReLU -> MaxPool2D(2) run as
    conv2d_relu_maxpool_forward/backward (_cpu_step.py), bit-identical to the layers; cuda matches within float32
    tolerance. bn_relu_maxpool_backward takes dgamma=None as batchnorm_backward does.

Ops: forward returns (y, cache); backward takes the cache. Backward *accumulates* parameter gradients into the arrays it
is given (dw += ..., db += ...; PyTorch semantics) and returns dx, or None when need_dx is False. No op modifies its
inputs (x, dy, w, b); the only in-place effects are the gradient accumulators and BatchNorm's running statistics.
--------------------------------------------------------------------------------------------------------------------
dense_forward(x[N,F], w[K,F], b[K]|None) -> y[N,K], cache
dense_backward(dy[N,K], cache, dw[K,F], db[K]|None, need_dx=True) -> dx[N,F]|None
conv2d_forward(x[N,C,H,W], w[K,C,R,S], b[K]|None, stride:int, padding:int) -> y[N,K,P,Q], cache
    P = (H + 2*padding - R)//stride + 1, Q likewise; zero padding.
conv2d_backward(dy, cache, dw, db|None, need_dx=True) -> dx|None
maxpool2d_forward(x[N,C,H,W], kernel:int, stride:int) -> y[N,C,P,Q], cache     P = (H - kernel)//stride + 1
maxpool2d_backward(dy, cache) -> dx        gradient goes to the first maximum of each window (row-major order),
                                           overlapping windows add
avgpool2d_forward(x, kernel, stride) -> y, cache ;  avgpool2d_backward(dy, cache) -> dx
global_avgpool2d_forward(x[N,C,H,W]) -> y[N,C], cache ; global_avgpool2d_backward(dy, cache) -> dx
relu_forward(x) -> y, cache ;      relu_backward(dy, cache) -> dx          (dx = dy where x > 0)
sigmoid_forward / sigmoid_backward, tanh_forward / tanh_backward        (cache holds y)
gelu_forward(x) -> y, cache ;      gelu_backward(dy, cache) -> dx          (the exact erf form, PyTorch's default)
    y = x * Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2 = erfc(-x / sqrt 2) / 2 (the standard normal CDF);
    dx = dy * (Phi(x) + x * phi(x)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi). The cache holds x.
scale_forward(x, factor: float) -> y, cache ;  scale_backward(dy, cache) -> dx     y = factor * x; dx = factor * dy
softmax_forward(x[N,K]) -> y, cache ; softmax_backward(dy, cache) -> dx = y * (dy - sum(dy*y, axis=1))
batchnorm_forward(x[N,C] or [N,C,H,W], gamma[C], beta[C], running_mean[C], running_var[C], momentum, eps,
                  training: bool) -> y, cache
    training: normalise with the batch's mean and biased variance; update running stats in place as PyTorch:
    running = (1 - momentum) * running + momentum * stat, with the *unbiased* variance for running_var.
    eval: normalise with the running statistics.
batchnorm_backward(dy, cache, dgamma[C]|None, dbeta[C]) -> dx   (eval-mode cache: dx = dy * gamma / sqrt(rv + eps))
    dgamma None: dE/dgamma is not computed (a frozen or constant scale); dx is the same.
dropout_forward(x, p: float, seed: int) -> y, cache    keep element i (flat, C order) iff
    hetnet.random.counter_uniform(seed, x.size)[i] >= p; y = x * keep / (1 - p). Same mask on every backend.
dropout_backward(dy, cache) -> dx

Losses (mean over the batch):
softmax_cross_entropy(logits[N,K], labels[N] int, label_smoothing=0.0) -> (loss: float, dlogits[N,K])
    target distribution t = (1 - ls) * onehot + ls / K; loss = mean_n(-sum_k t_k log softmax_k);
    dlogits = (softmax - t) / N. Log-sum-exp stabilised.
softmax_cross_entropy_stats(logits, labels) -> (loss_sum: float, correct: int)     no gradient, for evaluation
binary_cross_entropy_with_logits(logits, targets same shape, float in [0,1]) -> (loss: float, dlogits)
    loss = mean(max(z,0) - z*t + log1p(exp(-|z|))); dlogits = (sigmoid(z) - t) / z.size

Optimiser updates (in place on p and the state arrays; all arrays the same shape, often one flat buffer):
sgd_update(p, g, buf|None, lr, momentum, dampening, nesterov, weight_decay, first_step: bool) -> None
    exactly torch.optim.SGD: d = g + wd*p; if momentum: buf = d on the first step, else
    buf = momentum*buf + (1-dampening)*d; d = d + momentum*buf if nesterov else buf. p -= lr*d. g is not modified.
adam_update(p, g, m, v, step:int, lr, beta1, beta2, eps, weight_decay, decoupled: bool) -> None
    exactly torch Adam (decoupled=False: d = g + wd*p) / AdamW (decoupled=True: p *= 1 - lr*wd); step counts from 1;
    m = b1*m + (1-b1)*d; v = b2*v + (1-b2)*d*d; p -= lr * (m/(1-b1^step)) / (sqrt(v/(1-b2^step)) + eps).
"""
