"""The methods' loss terms written out from the published formulas (METHOD.md), independently
of the code under test, for float64 comparisons: CoCoRD's contrastive and prediction terms,
cross-entropy, Hinton's KD and CRD's NCE loss with its memory banks."""
import math

import torch


def unit(v):
    return v / torch.sqrt((v * v).sum())


def logsumexp(values):
    top = max(values)
    return top + torch.log(sum(torch.exp(v - top) for v in values))


def formula_ctr(z, k, queue, temperature, normalize=True):
    """mean_i CE([q_i.k_i, q_i.Q] / tau, 0) with q = z/|z|, k/|k| (or z, k as they are), and
    the fraction of rows whose positive wins."""
    loss, wins = 0.0, 0
    for i in range(len(z)):
        q_i, k_i = (unit(z[i]), unit(k[i])) if normalize else (z[i], k[i])
        positive = (q_i * k_i).sum() / temperature
        negatives = [(q_i * row).sum() / temperature for row in queue]
        loss = loss + logsumexp([positive, *negatives]) - positive
        wins += int(all(positive >= n for n in negatives))
    return loss / len(z), wins / len(z)


def formula_pred(p, t, p2, t2):
    terms = [(2 - 2 * (unit(p[i]) * unit(t[i])).sum()) + (2 - 2 * (unit(p2[i]) * unit(t2[i])).sum())
             for i in range(len(p))]
    return sum(terms) / len(terms)


def formula_ce(logits, labels):
    return sum(logsumexp(list(row)) - row[y] for row, y in zip(logits, labels)) / len(labels)


def formula_kd(student_logits, teacher_logits, temperature):
    total = 0.0
    for s, t in zip(student_logits, teacher_logits):
        log_ps = s / temperature - logsumexp(list(s / temperature))
        log_pt = t / temperature - logsumexp(list(t / temperature))
        total = total + (torch.exp(log_pt) * (log_pt - log_ps)).sum()
    return temperature ** 2 * total / len(student_logits)


@torch.no_grad()
def recompute_terms(method, batch):
    """Each network output of one CoCoRD step, recomputed module by module (BatchNorm in
    training mode normalises with batch statistics, so a second forward gives the same
    outputs)."""
    x_s, x_s2, x_t = batch.views
    features = method.student_encoder.forward_features(x_s)
    z = method.student_projector(features)
    z2 = method.student_projector(method.student_encoder.forward_features(x_s2))
    return dict(
        logits=method.student_encoder.forward_head(features), z=z,
        p=method.predictor(z), p2=method.predictor(z2),
        k=method.teacher_projector(method.teacher_encoder.forward_features(x_t)),
        t=method.slow_projector(method.slow_encoder.forward_features(x_s2)),
        t2=method.slow_projector(method.slow_encoder.forward_features(x_s)),
        teacher_logits=method.teacher_encoder(x_s))


def reference_nce(x: list[list[float]], n_data: int) -> float:
    """-mean_i[log(x_i0/(x_i0 + K/n + eps)) + sum_j log((K/n)/(x_ij + K/n + eps))], in Python."""
    eps, total = 1e-7, 0.0
    for row in x:
        noise = (len(row) - 1) / n_data
        total += math.log(row[0] / (row[0] + noise + eps))
        total += sum(math.log(noise / (xj + noise + eps)) for xj in row[1:])
    return -total / len(x)


def reference_step(loss, f_s, f_t, index, contrast_index):
    """One forward of CRD's loss module `loss` written out: returns the loss, (Z_s, Z_t), the
    new student bank and the new teacher bank."""
    n_data, tau, momentum = loss.num_data, loss.temperature, loss.memory_momentum

    def embed(linear, f):
        v = f @ linear.weight.T + linear.bias
        return v / v.pow(2).sum(1, keepdim=True).sqrt()

    with torch.no_grad():
        v_s, v_t = embed(loss.student_embed.linear, f_s), embed(loss.teacher_embed.linear, f_t)
    s_bank, t_bank = loss.student_memory.clone(), loss.teacher_memory.clone()
    z_old = [loss.student_normalizer.item(), loss.teacher_normalizer.item()]
    # Student embedding against teacher-bank rows; teacher embedding against student-bank rows.
    raw = [[[math.exp(float(t_bank[j] @ v_s[i]) / tau) for j in contrast_index[i].tolist()]
            for i in range(len(index))],
           [[math.exp(float(s_bank[j] @ v_t[i]) / tau) for j in contrast_index[i].tolist()]
            for i in range(len(index))]]
    z = [z0 if z0 > 0 else sum(map(sum, r)) / (len(r) * len(r[0])) * n_data
         for z0, r in zip(z_old, raw)]
    value = sum(reference_nce([[s / zd for s in row] for row in r], n_data)
                for r, zd in zip(raw, z))
    for bank, v in ((s_bank, v_s), (t_bank, v_t)):
        for i, row in enumerate(index.tolist()):
            mixed = momentum * bank[row] + (1 - momentum) * v[i]
            bank[row] = mixed / mixed.norm()
    return value, z, s_bank, t_bank
