"""AE, VAE, IRAE and IRVAE as one small module, with the official IRVAE MLPs.

- ``ae``: deterministic encoder, loss = per-pixel mean squared error (the official ``AE``).
- ``vae``: encoder outputs (mean, log-sigma); loss = Gaussian negative log-likelihood with a learned
  isotropic decoder noise ``sigma`` (one scalar, stored as ``log_sigma``) + KL to N(0, I), summed
  over dimensions and averaged over the batch (the official ``VAE`` with ``IsotropicGaussian``).
- ``irae`` / ``irvae``: the same plus ``iso_weight * isofast.distortion(decoder, z, measure)`` on the
  reparameterised codes (``z = mu + sigma * eps`` for the VAE); isofast applies the mixup itself.
  ``iso_weighting="recon_scale"`` (VAEs) multiplies the weight by ``sigma0^2 / sigma^2``, detached.

The decoder is always a function ``(B, m) -> (B, D)`` with flattened outputs. The MLP decoder is a
plain ``nn.Sequential`` of ``nn.Linear`` and activations so that isofast recognises it and takes its
fused path; ``--decoder conv`` gives a transposed-conv decoder that isofast carries on its
fused_sequential path (exact estimator) or its generic path (Hutchinson).
Note: the AE loss is a per-pixel mean while the VAE loss is a per-sample sum over D pixels scaled by
1/sigma^2, so the same ``iso_weight`` means far less for an IRVAE than for an IRAE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import isofast

MODELS = ("ae", "vae", "irae", "irvae")
#: How the regulariser's weight evolves: ``constant`` (official) or ``recon_scale`` (times the
#: reconstruction term's current scale relative to its initial one, sigma0^2 / sigma^2, detached).
WEIGHTINGS = ("constant", "recon_scale")
DECODERS = ("mlp", "conv")
#: Hidden widths of the official IRVAE encoder and decoder MLPs.
OFFICIAL_HIDDEN = (256, 256, 256, 256)


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, out_act: nn.Module | None = None) -> nn.Sequential:
    """``in_dim -> hidden... -> out_dim`` with ReLU between layers and ``out_act`` at the end.

    A flat ``nn.Sequential`` of ``nn.Linear`` and activation modules, nothing else (isofast's fused
    MLP path pattern-matches exactly this). No ``inplace=True`` ReLU: the fused path and autograd
    both need the pre-activations.
    """
    layers: list[nn.Module] = []
    prev = in_dim
    for width in hidden:
        layers += [nn.Linear(prev, width), nn.ReLU()]
        prev = width
    layers.append(nn.Linear(prev, out_dim))
    if out_act is not None:
        layers.append(out_act)
    return nn.Sequential(*layers)


class ConvDecoder(nn.Module):
    """``(B, m) -> (B, C*H*W)``: a Linear to ``(64, H/4, W/4)`` then two stride-2 transposed convs.

    Ends in a sigmoid and flattens, so it is a drop-in for the MLP decoder on images whose sides are
    divisible by 4 (8x8 digits, 28x28 MNIST).
    """

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], width: int = 64) -> None:
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ValueError(f"--decoder conv needs image sides divisible by 4, got {h}x{w}")
        self.base = (width, h // 4, w // 4)
        self.fc = nn.Linear(latent_dim, width * (h // 4) * (w // 4))
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(width // 2, c, 4, stride=2, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: Tensor) -> Tensor:
        """``z (B, m)`` -> flattened image ``(B, C*H*W)``."""
        return self.net(self.fc(z).view(-1, *self.base)).flatten(1)

    def isofast_sequential(self) -> nn.Sequential:
        """:meth:`forward` as one ``nn.Sequential`` of the same modules, so isofast carries its
        tangent streams through these layers (the fused_sequential path)."""
        return nn.Sequential(self.fc, nn.Unflatten(1, self.base), *self.net, nn.Flatten())


class IsoAutoencoder(nn.Module):
    """One of ``ae`` / ``vae`` / ``irae`` / ``irvae`` (see the module docstring).

    ``forward(x)`` returns the training objective and its parts; ``encode`` returns the encoder
    means used for evaluation. ``sync`` is set by the training loop under DDP so the distortion's
    batch means are all-reduced across ranks (isofast does it with a differentiable collective).
    """

    def __init__(
        self,
        kind: str,
        encoder: nn.Module,
        decoder: nn.Module,
        latent_dim: int,
        *,
        iso_weight: float = 0.0,
        measure: str = "scaled_isometry",
        eta: float | None = 0.2,
        estimator: str = "auto",
        n_probes: int = 1,
        init_sigma: float = 1.0,
        iso_weighting: str = "constant",
        reg_every: int = 1,
        reg_subsample: float = 1.0,
    ) -> None:
        super().__init__()
        if kind not in MODELS:
            raise ValueError(f"unknown model {kind!r}; choose one of {', '.join(MODELS)}")
        if iso_weighting not in WEIGHTINGS:
            raise ValueError(f"--iso-weighting must be one of {', '.join(WEIGHTINGS)}, got {iso_weighting!r}")
        if iso_weighting == "recon_scale" and kind in ("ae", "irae"):
            raise ValueError("--iso-weighting recon_scale needs a VAE (its reconstruction term is scaled by "
                             f"the learned 1/sigma^2); the {kind} loss has a fixed scale")
        self.iso_weighting = iso_weighting
        self.init_log_sigma = math.log(init_sigma)
        self.kind = kind
        self.variational = kind in ("vae", "irvae")
        self.regularised = kind in ("irae", "irvae")
        self.encoder = encoder
        self.decoder = decoder
        self.latent_dim = latent_dim
        self.iso_weight = float(iso_weight) if self.regularised else 0.0
        self.measure = measure
        self.eta = eta
        self.estimator = estimator
        self.n_probes = n_probes
        self.sync = False
        # Lazy (every k-th step, scaled by k) and subsampled regularisation; weight 1: iso_weight
        # is applied below. Its call count is in state_dict, so checkpoints resume the schedule.
        self.regularizer = isofast.IsometricRegularizer(
            measure, eta=eta, estimator=estimator, n_probes=None if estimator == "exact" else n_probes, every=reg_every, subsample=reg_subsample)
        if self.variational:
            # Learned isotropic Gaussian decoder noise; log-parameterised so sigma stays positive
            # (the official code learns sigma directly, initialised to 1).
            self.log_sigma = nn.Parameter(torch.tensor(math.log(init_sigma)))
        #: Optional hook ``(z) -> z`` applied to the codes handed to the regulariser (the loop
        #: uses it to time the regulariser's backward); identity by default.
        self.reg_input_hook = None
        self.reg_output_hook = None

    def encode(self, x: Tensor) -> Tensor:
        """``x (B, D)`` -> encoder means ``(B, m)``."""
        out = self.encoder(x)
        return out[:, : self.latent_dim]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x (B, D)`` -> ``{"loss", "recon", "kl", "reg"}`` (0-d tensors; ``loss`` is the objective).

        ``recon`` is the per-pixel MSE for AEs and the Gaussian NLL per sample for VAEs; ``reg`` is
        the unweighted distortion (0 for unregularised models; with ``reg_every = k`` it is ``k``
        times the distortion on every ``k``-th training call and 0 on the others).
        """
        out = self.encoder(x)
        if self.variational:
            mu, log_sig = out[:, : self.latent_dim], out[:, self.latent_dim :]
            z = mu + log_sig.exp() * torch.randn_like(mu)  # reparameterisation trick
            xhat = self.decoder(z)
            d = x.shape[1]
            sigma2 = (2 * self.log_sigma).exp()
            # -log N(x; xhat, sigma^2 I), summed over the D pixels.
            recon = (0.5 * ((x - xhat) ** 2).sum(1) / sigma2 + d * self.log_sigma + 0.5 * d * math.log(2 * math.pi)).mean()
            # KL(N(mu, sigma^2) || N(0, I)), analytic.
            kl = 0.5 * (mu**2 + (2 * log_sig).exp() - 2 * log_sig - 1).sum(1).mean()
        else:
            z = out
            xhat = self.decoder(z)
            recon = ((x - xhat) ** 2).mean()
            kl = recon.new_zeros(())
        loss = recon + kl
        if self.regularised:
            # Computed last on purpose: the autograd engine then runs its backward first, which is
            # what lets the loop time it (see loop.RegTimer).
            zr = z if self.reg_input_hook is None else self.reg_input_hook(z)
            self.regularizer.sync = self.sync
            reg = self.regularizer(self.decoder, zr)
            if self.reg_output_hook is not None:
                reg = self.reg_output_hook(reg)
            weight = self.iso_weight
            if self.iso_weighting == "recon_scale":
                # sigma0^2 / sigma^2, detached: the regulariser keeps its initial share of the
                # objective as the reconstruction term's 1/sigma^2 grows.
                weight = weight * (2 * (self.init_log_sigma - self.log_sigma)).exp().detach()
            loss = loss + weight * reg
        else:
            reg = loss.new_zeros(())
        return {"loss": loss, "recon": recon, "kl": kl, "reg": reg}


def build_model(
    kind: str,
    data_dim: int,
    latent_dim: int = 2,
    *,
    hidden: Sequence[int] = OFFICIAL_HIDDEN,
    decoder: str = "mlp",
    image_shape: tuple[int, int, int] | None = None,
    iso_weight: float = 0.0,
    measure: str = "scaled_isometry",
    eta: float | None = 0.2,
    estimator: str = "auto",
    n_probes: int = 1,
    init_sigma: float = 1.0,
    iso_weighting: str = "constant",
    reg_every: int = 1,
    reg_subsample: float = 1.0,
) -> IsoAutoencoder:
    """The official IRVAE architecture for ``kind`` on ``data_dim``-dimensional data.

    Encoder: MLP ``D -> hidden -> m`` (AE) or ``-> 2m`` (mean, log-sigma; VAE), linear output.
    ``init_sigma`` is the initial decoder noise scale of the VAEs' Gaussian likelihood.
    Decoder: MLP ``m -> hidden -> D`` ending in a sigmoid for images (``image_shape`` given) and
    linear for vector data, or a :class:`ConvDecoder` (images only).
    """
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    variational = kind in ("vae", "irvae")
    enc = mlp(data_dim, hidden, 2 * latent_dim if variational else latent_dim)
    if decoder == "conv":
        if image_shape is None:
            raise ValueError("--decoder conv needs an image dataset")
        dec: nn.Module = ConvDecoder(latent_dim, image_shape)
    else:
        dec = mlp(latent_dim, list(reversed(list(hidden))), data_dim, nn.Sigmoid() if image_shape else None)
    return IsoAutoencoder(
        kind, enc, dec, latent_dim, iso_weight=iso_weight, measure=measure, eta=eta,
        estimator=estimator, n_probes=n_probes, init_sigma=init_sigma, iso_weighting=iso_weighting,
        reg_every=reg_every, reg_subsample=reg_subsample,
    )
