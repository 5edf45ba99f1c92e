"""``recon`` stage ``hfs_sde``: score-based diffusion in high-frequency k-space (:mod:`.hfs_sde`).

HFS-SDE (Cao et al., IEEE TMI 2024) with a score network trained by ``qsmkit train hfs_sde``.
The coil-combined complex image is the diffusion variable (SENSE maps from a ``coil_maps``
stage); the model's low-frequency region must be acquired (fastMRI centre lines / ACS); the
sampler runs batched over ``batch_slices`` slices on ``device``.

Parameters follow the authors' sampling config: ``n_steps`` 1000 (100 with ``accelerated``),
``snr`` 0.16 (0.32 accelerated), ``mse`` 2.5, ``corrector_mse`` 0.1, Euler-Maruyama predictor and
Langevin corrector. Their tuning guide: artefacts -> raise ``snr``; blur or noise -> lower it;
global brightness -> adjust ``mse`` / ``corrector_mse``. Two defaults are ours: ``support``
(the final image is zero where every map is zero: background that the data do not see and the
sampler fills from the prior) and ``t_eps`` 0.03 with accelerated sampling (Tweedie's noise removal
at a later time: 100 steps leave more noise than ``s(1e-3)``); both were chosen on validation slices
(``bench_hfs_sde.py --seed 7``), never on the benchmark's held-out seed. ``samples`` (ours, default
1) averages that many posterior samples (each a whole reverse process).

``checkpoint`` defaults to the shipped small model (``weights/hfs_sde_small.pt``: 128 x 128
simulated anatomies, 16 low-frequency columns). Its quality depends entirely on the training
data: it has never seen a real scan; train on prepared data (``qsmkit kspace prepare``) for
real use, and use a GPU for the published-size network.
"""

from __future__ import annotations

from pathlib import Path

from qsmkit import Param
from qsmkit.device import DEVICE_PARAM
from qsmkit.errors import CheckpointError, ConfigError

from .stages_recon import _COMMON_RECON, _Recon

__all__ = ["HfsSde", "SHIPPED", "load_score_model"]

#: the shipped small model (see the plugin README)
SHIPPED = Path(__file__).with_name("weights") / "hfs_sde_small.pt"


def load_score_model(path, device):
    """``(eps_model, network, ckpt)`` of an ``hfs_sde`` checkpoint on ``device`` (one-line errors)."""
    import torch

    from qsmkit.checkpoints import load_checkpoint, load_weights

    from .hfs_sde import HFSSDE
    from .score_net import build_score_net

    ckpt = load_checkpoint(path, "hfs_sde")
    norm = ckpt["normalisation"]
    for key in ("normalize_coeff", "sde", "low_frequency"):
        if key not in norm:
            raise CheckpointError(f"checkpoint {path} lacks normalisation['{key}']; it was not written by "
                                  "'qsmkit train hfs_sde'")
    try:
        net = build_score_net(dict(ckpt["arch"]))
        sde = HFSSDE.from_dict(dict(norm["sde"]))
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} declares an architecture this version cannot build ({exc})") from None
    load_weights(net, ckpt["model"], path)
    net = net.to(device).eval()

    f = net.factor

    def eps_model(x, t):
        # image sides not divisible by the network's downsampling: zero-pad the image (centred) for the
        # network and crop its output (the padded border is background)
        H, W = x.shape[-2:]
        ph, pw = (-H) % f, (-W) % f
        inp = torch.stack([x.real, x.imag], 1)
        if ph or pw:
            inp = torch.nn.functional.pad(inp, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        out = net(inp, t)[..., ph // 2: ph // 2 + H, pw // 2: pw // 2 + W]
        return torch.complex(out[:, 0], out[:, 1])

    return eps_model, net, ckpt, sde


class HfsSde(_Recon):
    """HFS-SDE: predictor-corrector sampling of the high frequencies with SENSE data consistency."""

    name = "hfs_sde"
    reads = ("kspace", "maps")
    description = ("HFS-SDE (Cao et al. 2024): score-based diffusion in high-frequency k-space, predictor-corrector "
                   "sampling with SENSE data consistency (trained by 'qsmkit train hfs_sde')")
    params = _COMMON_RECON + (
        Param("checkpoint", str, "", doc="model.pt of 'qsmkit train hfs_sde' (empty: the shipped small 128x128 model)"),
        Param("accelerated", bool, False, doc="the authors' accelerated sampling: n_steps 100 and snr 0.32 by default"),
        Param("n_steps", int, None, range=(1, 100000), doc="predictor-corrector iterations N (default 1000; 100 accelerated)"),
        Param("snr", float, None, range=(0.0, 10.0), doc="Langevin signal-to-noise ratio (default 0.16; 0.32 accelerated)"),
        Param("mse", float, 2.5, range=(0.0, 1e3), doc="weight of the measurement gradient in the predictor"),
        Param("corrector_mse", float, 0.1, range=(0.0, 1e3), doc="weight of the measurement gradient in the corrector"),
        Param("predictor", str, "euler_maruyama", choices=("euler_maruyama", "reverse_diffusion", "none"),
              doc="predictor of each iteration"),
        Param("corrector", str, "langevin", choices=("langevin", "none"), doc="corrector of each iteration"),
        Param("hard_dc", bool, True, doc="replace the acquired samples outside the low-frequency region after each step"),
        Param("denoise", bool, True, doc="finish with Tweedie's estimate at t_eps (score_sde noise_removal)"),
        Param("support", bool, True, doc="zero the final image where every map is zero (cropped ESPIRiT maps: "
              "the background, which the data do not see and the sampler fills from the prior)"),
        Param("samples", int, 1, range=(1, 64),
              doc="posterior samples averaged (complex mean: an estimate of the posterior mean; each costs "
                  "a whole reverse process)"),
        Param("t_eps", float, None, range=(1e-6, 0.5),
              doc="last diffusion time, where Tweedie's estimate removes the noise (default 1e-3; 0.03 accelerated)"),
        Param("low_frequency", str, "model", choices=("model", "low_frequency", "center"),
              doc="deterministic low-frequency region: the model's, central columns, or a central box"),
        Param("acs", int, None, range=(1, 4096), doc="width of the low-frequency region in samples (default: the model's)"),
        Param("seed", int, 0, range=(0, 2 ** 63 - 1), doc="seed of the sampling noise"),
        Param("normalize", bool, True, doc="divide k-space by the max of the zero-filled image (undone on output)"),
        DEVICE_PARAM)

    def run(self, ctx, p):
        self._loaded = None
        self._batch = 0  # batches get seeds seed, seed + 1, ...
        return super().run(ctx, p)

    def _model(self, p, device, ctx):
        key = (p.checkpoint, str(device))
        if self._loaded is None or self._loaded[0] != key:
            path = Path(p.checkpoint) if p.checkpoint else SHIPPED
            eps_model, net, ckpt, sde = load_score_model(path, device)
            self._loaded = (key, eps_model, ckpt, sde)
            n = sum(t.numel() for t in net.parameters())
            ctx.log(f"HFS-SDE model {path.name}: {n / 1e6:.2f} M parameters, trained on "
                    f"{ckpt['normalisation'].get('image_size')} images, {sde.kind} SDE")
        return self._loaded[1:]

    def reconstruct(self, y, maps, mask, p, ctx):
        import torch

        from qsmkit.progress import progress_callback

        from .hfs_sde import hfs_sde_reconstruct, low_frequency_mask

        eps_model, ckpt, sde = self._model(p, y.device, ctx)
        norm = ckpt["normalisation"]
        lf = dict(norm["low_frequency"])
        kind = lf["kind"] if p.low_frequency == "model" else p.low_frequency
        acs = int(lf["acs"]) if p.acs is None else int(p.acs)
        trained = norm.get("image_size")
        if trained and list(trained) != list(y.shape[-2:]):
            ctx.log(f"HFS-SDE: the model was trained on {trained[0]} x {trained[1]} images, this k-space is "
                    f"{y.shape[-2]} x {y.shape[-1]}; quality on other sizes is untested")
        L = low_frequency_mask(y.shape[-2:], kind, acs)
        n_steps = p.n_steps if p.n_steps is not None else (100 if p.accelerated else 1000)
        snr = p.snr if p.snr is not None else (0.32 if p.accelerated else 0.16)
        t_eps = p.t_eps if p.t_eps is not None else (0.03 if p.accelerated else 1e-3)
        gen = torch.Generator(device=y.device).manual_seed(int(p.seed) + self._batch)
        self._batch += 1
        n = int(p.samples)
        x = None
        with progress_callback(n_steps * n, "HFS-SDE") as tick:
            for k in range(n):  # one generator: the first sample is the samples: 1 result
                xk = hfs_sde_reconstruct(eps_model, y, maps, mask, L, sde, n_steps=n_steps, snr=snr, mse=p.mse,
                                         corrector_mse=p.corrector_mse, predictor=p.predictor,
                                         corrector=p.corrector, hard_dc=p.hard_dc, denoise=p.denoise, t_eps=t_eps,
                                         normalize_coeff=float(norm["normalize_coeff"]), generator=gen,
                                         tick=lambda j, k=k: tick(k * n_steps + j), support=p.support)
                x = xk if x is None else x + xk
        return (x / n)[:, None]
