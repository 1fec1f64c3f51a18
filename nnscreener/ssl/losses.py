"""Dense joint-embedding SSL objectives of Screener (paper, appendix A), applied to N positive pairs of voxel
descriptors (y1[i], y2[i]): the descriptors of all m images of a batch pooled, N = n * m (8192 in the paper).

DenseVICReg (the paper's default): MLP expander (up to 8192 dims), then invariance + variance + covariance terms.
DenseInfoNCE: MLP projector, L2 normalisation, temperature-scaled cross-entropy in which every other embedding of
the batch, same image included, is a negative.
The MLPs follow Screener's code (vox2vec): Linear-LayerNorm-GELU blocks and a final Linear. Their parameters
belong to the loss module: give them to the optimiser together with the network's.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from nnscreener.utilities.errors import ScreenerInputError
from nnscreener.utilities.tensors import at_least_float32


def gather_across_ranks(z: torch.Tensor) -> torch.Tensor:
    """All ranks' embeddings (N_total, d) under DDP, differentiably, so that VICReg's variance / covariance and
    InfoNCE's negatives see the whole global batch, as in VICReg's own multi-GPU code. A no-op without DDP.

    Every rank then computes the same loss; all_gather's backward sums the gradients of each rank's slice over the
    ranks, and DDP's gradient averaging divides by the world size again."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(z), dim=0)


def mlp(d_in: int, dims) -> nn.Module:
    """Linear-LayerNorm-GELU blocks to dims[:-1], then a Linear to dims[-1]; identity when dims is empty."""
    dims = tuple(dims)
    if not dims:
        return nn.Identity()
    layers, width = [], d_in
    for d in dims[:-1]:
        layers += [nn.Linear(width, d), nn.LayerNorm(d), nn.GELU()]
        width = d
    layers.append(nn.Linear(width, dims[-1]))
    return nn.Sequential(*layers)


def vicreg_terms(z1: torch.Tensor, z2: torch.Tensor, eps: float = 1e-4) -> dict:
    """The three VICReg terms of embeddings z1, z2 (N, D), row i of both a positive pair.

    inv = mean squared difference, (1 / (N D)) sum_i ||z1_i - z2_i||^2;
    var = mean over dims of relu(1 - sqrt(Var_d + eps)) (unbiased variance over the N rows);
    cov = sum of the squared off-diagonal entries of the covariance matrix, / D;
    var and cov are averaged over the two views, as in Screener's code (the paper's eq. sums them over views,
    i.e. a factor 2 absorbed by the weights).
    """
    n, d = z1.shape
    inv = F.mse_loss(z1, z2)
    var, cov = 0, 0
    for z in (z1, z2):
        z = at_least_float32(z)
        z = z - z.mean(dim=0)
        var = var + F.relu(1 - torch.sqrt(z.var(dim=0) + eps)).mean() / 2
        # scale before the product so that a fp16 autocast matmul cannot overflow (entries are ~ variances)
        z = z / (n - 1) ** 0.5
        c = at_least_float32(z.T @ z)
        cov = cov + (c.pow(2).sum() - c.diagonal().pow(2).sum()) / d / 2
    return {'inv': inv, 'var': var, 'cov': cov}


class DenseVICReg(nn.Module):
    """VICReg on positive pairs of dense descriptors: loss = sim_weight inv + var_weight var + cov_weight cov.

    Defaults are VICReg's / Screener's: expander 8192-8192-8192, weights 25 / 25 / 1, eps 1e-4.
    forward(y1, y2) takes descriptors (..., d_in) (e.g. `sample_features` outputs (B, n, d_in)), pools all leading
    dims into N pairs and returns (loss, {'inv', 'var', 'cov'}: the unweighted terms, detached, for logging).
    """

    def __init__(self, d_in: int, expander_dims=(8192, 8192, 8192), sim_weight: float = 25.0,
                 var_weight: float = 25.0, cov_weight: float = 1.0, eps: float = 1e-4):
        super().__init__()
        self.expander = mlp(d_in, expander_dims)
        self.weights = {'inv': sim_weight, 'var': var_weight, 'cov': cov_weight}
        self.eps = eps

    def forward(self, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, dict]:
        z1 = gather_across_ranks(self.expander(y1.reshape(-1, y1.shape[-1])))
        z2 = gather_across_ranks(self.expander(y2.reshape(-1, y2.shape[-1])))
        terms = vicreg_terms(z1, z2, self.eps)
        loss = sum(self.weights[k] * terms[k] for k in terms)
        return loss, {k: v.detach() for k, v in terms.items()}


def info_nce(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE (SimCLR's NT-Xent) of L2-normalised embeddings z1, z2 (N, D), row i a positive pair.

    Each of the 2N embeddings is an anchor; its positive is its pair, its negatives the other 2N - 2 embeddings
    (both views, same image included). Returns the mean over the 2N anchors of
    -log softmax(<anchor, .> / tau)[positive], the paper's eq. (1) divided by 2N.
    """
    n = z1.shape[0]
    z = at_least_float32(torch.cat([z1, z2]))
    logits = z @ z.T / tau
    logits.fill_diagonal_(float('-inf'))  # an embedding is not its own negative
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


class DenseInfoNCE(nn.Module):
    """InfoNCE on positive pairs of dense descriptors, after an MLP projector and L2 normalisation.

    Defaults are Screener's code's: projector 512-512-128, tau 0.1.
    forward(y1, y2) takes descriptors (..., d_in), pools the leading dims into N pairs and returns
    (loss, {'infonce': loss, 'positive_cosine': mean cosine similarity of the pairs}, detached).
    """

    def __init__(self, d_in: int, projector_dims=(512, 512, 128), tau: float = 0.1):
        super().__init__()
        if tau <= 0:
            raise ValueError(f'tau must be > 0, got {tau}')
        self.projector = mlp(d_in, projector_dims)
        self.tau = tau

    def forward(self, y1: torch.Tensor, y2: torch.Tensor) -> tuple[torch.Tensor, dict]:
        z1 = gather_across_ranks(F.normalize(at_least_float32(self.projector(y1.reshape(-1, y1.shape[-1]))), dim=1))
        z2 = gather_across_ranks(F.normalize(at_least_float32(self.projector(y2.reshape(-1, y2.shape[-1]))), dim=1))
        loss = info_nce(z1, z2, self.tau)
        return loss, {'infonce': loss.detach(), 'positive_cosine': (z1 * z2).sum(dim=1).mean().detach()}


SSL_LOSSES = {'vicreg': DenseVICReg, 'infonce': DenseInfoNCE}


def build_ssl_loss(name: str, d_in: int, **kwargs) -> nn.Module:
    """'vicreg' -> DenseVICReg(d_in, **kwargs), 'infonce' -> DenseInfoNCE(d_in, **kwargs)."""
    if name not in SSL_LOSSES:
        raise ScreenerInputError(f'unknown SSL loss {name!r}: use one of {", ".join(SSL_LOSSES)}')
    return SSL_LOSSES[name](d_in, **kwargs)


def ssl_loss_of_block(ssl, d_in: int) -> nn.Module:
    """The SSL loss of the plans' `ssl` block (`SSLSettings`; VICReg takes its expander from it; InfoNCE keeps its
    defaults)."""
    kwargs = {'expander_dims': ssl.expander_dims} if ssl.loss == 'vicreg' else {}
    return build_ssl_loss(ssl.loss, d_in, **kwargs)
