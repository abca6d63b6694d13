"""Synchronous double quantization in NumPy, from its update: the server keeps the exact model
``x``, workers hold ``x_hat``; b-bit gradients up, the b_x-bit change ``Q(x - x_hat)`` down.

The oracle of :class:`horovod_squeeze.DoubleQuantization`; it shares no code with the stages it
checks. Its state is ``e = x - x_hat``, so ``x`` itself is ``x_hat + e``.
"""


def step(algorithm, gradients, workers, server, worker_compress, server_compress, learning_rate):
    """One segment, n workers; returns what every worker adds to ``x_hat``, and the new state.
    Constants take the gradients' precision (float32, or float64 for a float64 model)."""
    real = gradients[0].dtype.type
    quantized = [worker_compress(i, g) for i, g in enumerate(gradients)]   # Q(b)(g_i)
    average = sum(quantized[1:], quantized[0]) / real(len(quantized))
    # x_new - x_hat = (x - gamma * average) - x_hat = -gamma * average + e
    q = average * real(-learning_rate) + server["model_error"]
    c = server_compress(q)                                                  # Q(b_x)(x_new - x_hat)
    return c, {}, {"model_error": q - c}                                    # x_hat += c
