"""DORE in NumPy, from the paper's update (Liu, Li, Tang, Yan, AISTATS 2020, Algorithm 1), without
the proximal term: learned shifts on the workers, an error-compensated model residual on the server.

The oracle of :class:`horovod_squeeze.DORE`; it shares no code with the stages it checks.
"""


def step(algorithm, gradients, workers, server, worker_compress, server_compress, learning_rate):
    """One segment, n workers; returns what every worker adds to its model, and the new state.
    Constants take the gradients' precision (float32, or float64 for a float64 model)."""
    real = gradients[0].dtype.type
    alpha, beta, eta = real(algorithm.alpha), real(algorithm.beta), real(algorithm.eta)
    shifts = workers["worker_shift"]
    sent = [worker_compress(i, g - h) for i, (g, h) in enumerate(zip(gradients, shifts))]
    new_shifts = [h + alpha * d for h, d in zip(shifts, sent)]               # h_i += alpha d_i
    d = sum(sent[1:], sent[0]) / real(len(sent))                            # d = mean_i d_i
    h = server["server_shift"]
    g_hat = h + d                                                           # g = h + d
    x_step = g_hat * real(-learning_rate)                                   # x_new - x_hat
    q = x_step + server["model_error"] * eta                                # q = step + eta e
    q_hat = server_compress(q)
    return (q_hat * beta,                                                   # x_hat += beta Q(q)
            {"worker_shift": new_shifts},
            {"server_shift": h + d * alpha, "model_error": q - q_hat})
