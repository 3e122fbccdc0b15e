"""Backends: how each op is done on one kind of device. Layers call these; they never import NumPy-vs-CuPy logic.

A backend is a module (`reference`, `cpu`) or an object (`cuda.CudaBackend(device_id)`) exposing the attributes below.
`hetnet.device.get_backend(name)` is the one place that chooses it. Every backend computes the same functions; the
float64 `reference` backend is the oracle the others are tested against. Everything above the backends -- layers,
hetnet.plan (the one way a model runs: forward, backward, training and evaluation steps), the optimisers -- calls only
what this page lists. Backends import nothing above them (errors, random and each other only).

Shape legend: N batch, C input channels, K output channels (filters), H/W input height/width, P/Q output height/width,
R/S kernel height/width, F features. Activations are NCHW (or NF for dense layers), C-contiguous.

Attributes
----------
name: str                       "reference" | "cpu" | "cuda:N"
precision: str                  "fp32" | "tf32" | "bf16": how its matrix products round (hetnet.device)
dtype: numpy dtype              float64 (reference) or float32 (cpu, cuda)
xp: module                      numpy or cupy, for the few array ops layers need (zeros_like, views)
fusions: frozenset[str]         the fusions of hetnet.plan.FUSIONS this backend runs faster than their parts; the plan
                                uses those (every backend implements every fused op below, natively or composed)

Conversions and allocation
--------------------------
asarray(a) -> arr               copy a NumPy array (any dtype) to the device in the backend's dtype
to_numpy(arr) -> np.ndarray     copy back to host (float dtype kept)
zeros(shape, dtype=None) -> arr  zero array of the backend's dtype (or of `dtype`: the steps' loss and count sums)
labels(a) -> arr                int labels to the device (int64 on NumPy backends, int32 on cuda)
synchronize() -> None           wait for queued device work (no-op on CPU)
upload(a) -> arr                copy a NumPy array to the device keeping its dtype (uint8 images, int32 plans)

Data-set batches (hetnet.data.ResidentLoader)
---------------------------------------------
resident_data: bool             True where training should keep the uint8 data set on the device (cuda)
gather_images(images[N,C,H,W] uint8, labels[N], plan[4,M] int32, start, count, scale[C] f32, shift[C] f32,
              reflect=False) -> x[count,C,H,W] (backend dtype), y[count]
    columns start..start+count of the plan (rows: index, oy, ox, flip): pixel (i, j) of example m is
    v = images[idx, c, sy, sx], sy = i + oy, sx = jj + ox, jj = W-1-j if flip else j. Outside the image v = 0
    (zero padding: a crop), or with reflect=True sy, sx are reflected into it without repeating the edge,
    r(k) = m if m < n else 2(n-1) - m with m = k mod 2(n-1) (n = 1: r = 0), np.pad's and torch's 'reflect' (a
    translate). Then x = float32(float32(v * scale[c]) + shift[c]) (two roundings, no fused multiply-add),
    exactly what hetnet.data.BatchLoader serves for the same plan.

Replayed steps (optional)
-------------------------
step_runner(n_scalars, n_seeds) -> runner
    How hetnet.plan runs a step here when the backend has a faster way than calling it: cuda captures it as a CUDA
    graph per batch shape and replays it (cuda/graph.py); without it the plan calls the step (plan.EagerRunner). A
    runner has `scalars` (a backend float32 array of n_scalars the optimiser's update reads: learning rate, flags),
    `seed(slot)` (dropout node `slot`'s seed), `set_scalars(values, seeds)`, `run(fn, x, y)`,
    `read_and_reset(*accumulators)` and `reset()` (forget the captured steps: the step's launches changed, see
    plan.TrainStep).

Weight copies (optional)
------------------------
weight_copies(store: dict, params) -> context manager
    hetnet.plan's steps open it around a step's forward and backward (not its update): params are the model's
    parameter arrays, store a dict the step keeps for its model. While it is open the weights do not change, and the
    convolutions may read copies of their weights that the backend made when it opened (cuda: the channels-last and
    turned copies of its tensor-core kernels, all in one launch, mma.StepCopies), instead of copying them per op.

Ops: forward returns (y, cache); backward takes the cache. Backward *accumulates* parameter gradients into the arrays it
is given (dw += ..., db += ...; PyTorch semantics) and returns dx, or None when need_dx is False. No op modifies its
inputs (x, dy, w, b); the only in-place effects are the gradient accumulators, BatchNorm's running statistics, the
optimiser updates and relu_mask (which writes over its dx).

Activations inside ops. `act` is None or "relu": the forward returns relu(op(x)). The ReLU's derivative is not the
op's backward but the *consumer's*: a backward given relu_mask=True knows that its input x was a ReLU output and
returns dE/dx * (x > 0), the gradient of the ReLU's input; `relu_mask(dx, x)` does the same for any other consumer.
So `conv2d_backward(dy, cache, ...)` after `conv2d_forward(..., act="relu")` takes dy = dE/d(conv output before the
ReLU). The fused ops below own the ReLUs inside them. `backends.compose` holds each fused op as the chain of ops it
stands for: that is its definition and the reference backend's version.
--------------------------------------------------------------------------------------------------------------------
dense_forward(x[N,F], w[K,F], b[K]|None, act=None) -> y[N,K], cache
dense_backward(dy[N,K], cache, dw[K,F]|None, db[K]|None, need_dx=True, relu_mask=False) -> dx[N,F]|None
    dw or db None: that gradient is not computed (a frozen parameter); dx and the other gradient are the same.
conv2d_forward(x[N,C,H,W], w[K,C,R,S], b[K]|None, stride:int, padding:int, act=None, relu_mask=None)
    -> y[N,K,P,Q], cache       P = (H + 2*padding - R)//stride + 1, Q likewise; zero padding. relu_mask: the
    relu_mask its backward will be called with (None: not known); False lets a backend keep less of x for the
    backward (cuda at bf16: the channels-last bf16 copy its convolutions read, instead of x).
conv2d_backward(dy, cache, dw|None, db|None, need_dx=True, relu_mask=False) -> dx|None    None: as dense_backward
maxpool2d_forward(x[N,C,H,W], kernel:int, stride:int) -> y[N,C,P,Q], cache     P = (H - kernel)//stride + 1
maxpool2d_backward(dy, cache, relu_mask=False) -> dx     gradient goes to the first maximum of each window
                                           (row-major order), overlapping windows add
relu_mask(dx, x) -> dx * (x > 0)           written over dx, which the caller hands over
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
                  training: bool, act=None, reduce=None) -> y, cache
    training: normalise with the batch's mean and biased variance; update running stats in place as PyTorch:
    running = (1 - momentum) * running + momentum * stat, with the *unbiased* variance for running_var.
    eval: normalise with the running statistics.
    reduce (synchronised BatchNorm, hetnet.parallel): None, or a function reduce(a) that sums a 1-D array of this
    backend (float64 or the backend's dtype) over the processes of a data-parallel job, in place. Every process
    calls the op with the same C at the same time; training then uses the mean and variance of all the processes'
    batches together (the per-channel sums and counts are reduced), and so does the running-stat update. Ignored
    in eval mode. The backward reads it from the cache.
batchnorm_backward(dy, cache, dgamma[C]|None, dbeta[C]|None, need_dx=True, relu_mask=False) -> dx|None
    (eval-mode cache: dx = dy * gamma / sqrt(rv + eps)); dgamma or dbeta None: that gradient is not computed (a
    frozen or constant parameter); dx is the same. Synchronised (a training cache made with reduce): dgamma and dbeta get this
    process's sums (the gradient reduction averages them over the processes); dx is d(sum of every process's
    loss)/dx, from per-channel sums of dy reduced over the processes.
    Hand-over (a backend with `takes_feeds`): batchnorm_forward, bn_relu_forward, bn_gelu_forward, gelu_forward and
    conv2d_gelu_forward also take feeds=None or feeds=(w_shape, stride, padding), saying that y's one reader is the
    forward of a Conv2D with weights of that shape (conv2d_forward or conv2d_maxpool_forward, given
    relu_mask=False), which will not mask by y (batchnorm_forward: act None); the backend may then return y in a
    form only those ops of its own read (cuda at bf16: the channels-last bf16 copy that its convolution keeps for
    the backward, where measured so, conv.Nhwc16). hetnet.plan passes it. Backwards, batchnorm_backward,
    bn_relu_backward and bn_gelu_backward also take
    grad_feeds=None or grad_feeds=(w_shape, stride, padding, x_shape, pool), saying that x is the output of a Conv2D
    with weights of that shape, without bias or act, on an input of x_shape, max-pooled after it (pool = (kernel,
    stride), conv2d_maxpool_forward) or not (None), and that dx's one reader is that op's backward; the backend may
    then return dx in a form only that backward reads (cuda at bf16: the channels-last bf16 copy of its dE/dy, or
    dE/dy stored in bf16 where its filter gradient reads that, conv.takes_dy16_nchw).
    And conv2d_forward and conv2d_maxpool_forward also take to_norm=False or True: True says that y's one reader is
    the batchnorm_forward, bn_relu_forward or bn_gelu_forward after it (and that op's backward, through its cache,
    given relu_mask=False); the backend may then return y in a form only those ops of its own read (cuda at bf16:
    y stored in bf16, conv.Nchw16, where the convolution runs on channels-last copies). Backwards, conv2d_backward
    and conv2d_maxpool_backward also take grad_to_norm=False or True: True says that dx's one reader is the backward
    of such a batch norm before the convolution, which may then be given dy in that form (cuda at bf16: the data
    gradient stored in bf16 where it runs on channels-last copies).
dropout_forward(x, p: float, seed) -> y, cache    keep element i (flat, C order) iff
    hetnet.random.counter_uniform(seed, x.size)[i] >= p; y = x * keep / (1 - p). Same mask on every backend.
    seed: an int, or a backend array of one uint32 read when the op runs (a replayed step fills it each time).
dropout_backward(dy, cache) -> dx

Fused ops (hetnet.plan.FUSIONS; definitions in backends.compose):
conv2d_relu_maxpool_forward(x, w, b, stride, padding, pool_kernel, pool_stride) -> y, cache
    maxpool2d(relu(conv2d(x))), the ReLU included in the backward
conv2d_relu_maxpool_backward(dy, cache, dw|None, db|None, need_dx=True, relu_mask=False) -> dx|None
conv2d_maxpool_forward(x, w, b, stride, padding, pool_kernel, pool_stride, relu_mask=None) -> y, cache
    maxpool2d(conv2d(x)) (airbench's blocks: no ReLU between); relu_mask as conv2d_forward's
conv2d_maxpool_backward(dy, cache, dw|None, db|None, need_dx=True, relu_mask=False) -> dx|None
conv2d_gelu_forward(x, w, b, stride, padding, relu_mask=None) -> y, cache
    gelu(conv2d(x)) (airbench's whitening layer and its GELU); relu_mask as conv2d_forward's
conv2d_gelu_backward(dy, cache, dw|None, db|None, need_dx=True, relu_mask=False) -> dx|None
    conv2d_backward of dz = gelu_backward(dy) at z = conv2d(x)
bn_relu_maxpool_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training, pool_kernel,
                        pool_stride, reduce=None) -> y, cache          maxpool2d(relu(batchnorm(x)))
bn_relu_maxpool_backward(dy, cache, dgamma, dbeta, need_dx=True, relu_mask=False, inplace=False) -> dx|None
    inplace: dx may be written over x, which the caller will not read again (ignored with relu_mask)
bn_relu_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training, reduce=None) -> y, cache
    relu(batchnorm(x)) owning the ReLU's derivative (batchnorm_forward with act="relu" leaves it to the consumer);
    statistics and running-stat update as batchnorm_forward
bn_relu_backward(dy, cache, dgamma|None, dbeta, need_dx=True, relu_mask=False, inplace=False) -> dx|None
    batchnorm_backward of dz = relu_backward(dy) at z = batchnorm(x); inplace as bn_relu_maxpool_backward
bn_gelu_forward(x, gamma, beta, running_mean, running_var, momentum, eps, training, reduce=None) -> y, cache
    gelu(batchnorm(x)) (airbench's BatchNorm -> GELU); statistics and running-stat update as batchnorm_forward
bn_gelu_backward(dy, cache, dgamma|None, dbeta, need_dx=True, relu_mask=False, inplace=False) -> dx|None
    batchnorm_backward of dz = gelu_backward(dy) at z = batchnorm(x), the GELU's derivative included; inplace as
    bn_relu_maxpool_backward
dense_chain_forward(x[N,F], layers=[(w[K,F], b[K]|None, relu: bool), ...]) -> y[N,K_last], cache
    Dense layers one after the other, each followed by a ReLU when relu; the chain owns all its ReLUs
dense_chain_backward(dy, cache, grads=[(dw|None, db|None), ...], need_dx=True, relu_mask=False, accumulate=True)
    -> dx|None          accumulate=False writes the gradients instead of adding to them; None: not computed

Losses (mean over the batch):
softmax_cross_entropy(logits[N,K], labels[N] int, label_smoothing=0.0) -> (loss: float, dlogits[N,K])
    target distribution t = (1 - ls) * onehot + ls / K; loss = mean_n(-sum_k t_k log softmax_k);
    dlogits = (softmax - t) / N. Log-sum-exp stabilised.
softmax_cross_entropy_stats(logits, labels) -> (loss_sum: float, correct: int)     no gradient, for evaluation
softmax_cross_entropy_into(logits, labels, dlogits|None, loss_sum[1] float64, correct[1] int64,
                           label_smoothing=0.0) -> None
    the steps' loss, without a host round trip: dlogits[...] = the gradient (unless None), loss_sum[0] += the sum of
    the per-example losses, correct[0] += the number of right argmaxes
binary_cross_entropy_with_logits(logits, targets same shape, float in [0,1]) -> (loss: float, dlogits)
    loss = mean(max(z,0) - z*t + log1p(exp(-|z|))); dlogits = (sigmoid(z) - t) / z.size

Optimiser updates (in place on p and the state arrays; all arrays the same shape, often one flat buffer). Each takes
`scalars`, a backend float32 array whose values it reads when it runs instead of the per-step arguments (so that a
replayed step follows the schedule): [lr, first_step] for SGD, [lr, 0, lr / (1 - beta1^step), 1 / (1 - beta2^step)]
for Adam. hetnet.optim's optimisers own these calls (Optimizer.update): one per parameter group and run of
neighbouring parameters that train (slices of the flat buffers), each given its group's block of the scalars.
sgd_update(p, g, buf|None, lr, momentum, dampening, nesterov, weight_decay, first_step: bool, scalars=None) -> None
    exactly torch.optim.SGD: d = g + wd*p; if momentum: buf = d on the first step, else
    buf = momentum*buf + (1-dampening)*d; d = d + momentum*buf if nesterov else buf. p -= lr*d. g is not modified.
adam_update(p, g, m, v, step:int, lr, beta1, beta2, eps, weight_decay, decoupled: bool, scalars=None) -> None
    exactly torch Adam (decoupled=False: d = g + wd*p) / AdamW (decoupled=True: p *= 1 - lr*wd); step counts from 1;
    m = b1*m + (1-b1)*d; v = b2*v + (1-b2)*d*d; p -= lr * (m/(1-b1^step)) / (sqrt(v/(1-b2^step)) + eps).
"""
