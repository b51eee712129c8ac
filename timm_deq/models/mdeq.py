""" Multiscale Deep Equilibrium Models (MDEQ) with Jacobian regularization

The network is one equilibrium layer: four parallel branches at decreasing resolution, each a
residual block, exchanging information through a multi-resolution fusion. The fixed point of that
layer is found by a root solver (``deq_core``) and fed to an HRNet-style classification head.

Papers:
    Multiscale Deep Equilibrium Models - Bai, Koltun, Kolter, NeurIPS 2020
    Stabilizing Equilibrium Models by Jacobian Regularization - Bai, Koltun, Kolter, ICML 2021

The solver, backward and JR options of ``deq_core.DEQConfig`` are model keyword arguments:
``timm.create_model('mdeq_small', f_max_iter=14, jac_weight=2.5)``.

Weights load through timm's own paths (``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=...)``,
``local-dir:`` and ``hf-hub:`` names); the authors' released ImageNet checkpoints of their own code
load into ``mdeq_small.locuslab_in1k`` and ``mdeq_xl.locuslab_in1k`` (``layout='original'``) through
:func:`checkpoint_filter_fn`.
"""
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier, register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg

from deq_core import (DEQConfig, DEQLayer, DEQStats, OptionValueError, VariationalDropout, apply_weight_norm,
                      name_deq_layers)

from ._mdeq_original import convert_original_state_dict, is_original_state_dict

__all__ = ['MDEQ', 'MultiscaleCell', 'checkpoint_filter_fn']

# timm's FX tracer (feature_cls='fx', symbolic tracing) keeps the equilibrium layer as one call:
# its solver loop cannot be traced.
register_notrace_module(DEQLayer)

LAYOUTS = ('timm', 'original')

_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)


class BranchBlock(nn.Module):
    """Residual block of one resolution inside f; the input injection enters before the norm."""

    def __init__(self, chs: int, expansion: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = _conv3x3(chs, chs * expansion)
        self.gn1 = nn.GroupNorm(groups, chs * expansion, affine=True)
        self.conv2 = _conv3x3(chs * expansion, chs)
        self.drop = VariationalDropout.channels2d(dropout)
        self.gn2 = nn.GroupNorm(groups, chs, affine=True)
        self.gn3 = nn.GroupNorm(groups, chs, affine=True)

    def forward(self, z: torch.Tensor, injection: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The block on one branch's state, with the injection added after its second conv (first branch)."""
        y = F.relu(self.gn1(self.conv1(z)))
        y = self.drop(self.conv2(y))
        if injection is not None:
            y = y + injection
        y = self.gn2(y)
        return self.gn3(F.relu(y + z))


class _Downsample(nn.Sequential):
    """``steps`` strided 3x3 convs with GroupNorm (ReLU between them) from one branch to a
    lower-resolution one."""

    def __init__(self, in_chs: int, out_chs: int, steps: int, groups: int) -> None:
        layers: List[nn.Module] = []
        for i in range(steps):
            last = i == steps - 1
            layers += [_conv3x3(in_chs, out_chs if last else in_chs, stride=2),
                       nn.GroupNorm(groups, out_chs if last else in_chs)]
            if not last:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class _Upsample(nn.Module):
    """1x1 conv and GroupNorm, then nearest upsampling to a higher-resolution branch's size."""

    def __init__(self, in_chs: int, out_chs: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.gn = nn.GroupNorm(groups, out_chs)

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        return F.interpolate(self.gn(self.conv(x)), size=size, mode='nearest')


class MultiscaleCell(nn.Module):
    """The MDEQ layer f(z, x): per-branch residual blocks, multi-resolution fusion, then per
    branch ReLU, 1x1 conv and GroupNorm. The state z is a list of one map per branch; the
    injection x (from the stem) enters the highest-resolution branch.

    Args:
        channels: Width of each branch (highest resolution first).
        expansion: Width multiplier inside each branch block.
        groups: GroupNorm groups of the blocks and the fusion.
        dropout: Variational dropout after each block's second conv.
        post_groups: GroupNorm groups after the fusion (default: ``groups``).
        post_affine: Whether the GroupNorm after the fusion has a learned scale and shift.
    """

    def __init__(self, channels: Sequence[int], expansion: int, groups: int, dropout: float,
                 post_groups: Optional[int] = None, post_affine: bool = False) -> None:
        super().__init__()
        self.channels = tuple(channels)
        n = len(self.channels)
        self.blocks = nn.ModuleList([BranchBlock(c, expansion, groups, dropout) for c in self.channels])
        self.fuse = nn.ModuleList()
        for j in range(n):
            row = nn.ModuleList()
            for i in range(n):
                if i < j:
                    row.append(_Downsample(self.channels[i], self.channels[j], j - i, groups))
                elif i > j:
                    row.append(_Upsample(self.channels[i], self.channels[j], groups))
                else:
                    row.append(nn.Identity())
            self.fuse.append(row)
        self.post = nn.ModuleList([
            nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1, bias=False),
                          nn.GroupNorm(post_groups or groups, c, affine=post_affine))
            for c in self.channels])

    def init_state(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Zeros for every branch; each branch halves the previous one's size (rounding up, as a
        strided 3x3 conv does)."""
        h, w = x.shape[-2:]
        state = []
        for c in self.channels:
            state.append(x.new_zeros(x.shape[0], c, h, w))
            h, w = (h + 1) // 2, (w + 1) // 2
        return state

    def forward(self, z: List[torch.Tensor], x: torch.Tensor) -> List[torch.Tensor]:
        """f(z, x): the branch blocks, the multi-resolution fusion and the post-fusion normalization."""
        ys = [block(zi, x if i == 0 else None) for i, (block, zi) in enumerate(zip(self.blocks, z))]
        out = []
        for j, row in enumerate(self.fuse):
            size = ys[j].shape[-2:]
            # Summed in branch order, as the original code does (the same rounding).
            acc = ys[0] if j == 0 else row[0](ys[0])
            for i in range(1, len(row)):
                if i < j:
                    acc = acc + row[i](ys[i])
                elif i > j:
                    acc = acc + row[i](ys[i], size)
                else:
                    acc = acc + ys[i]
            out.append(self.post[j](acc))
        return out


class Bottleneck(nn.Module):
    """ResNet bottleneck (BatchNorm) used by the classification head, expansion 4.

    Args:
        in_chs: Input channels.
        planes: Inner width (the output has ``4 * planes`` channels).
        norm_affine: Whether the three BatchNorms of the residual path have a learned scale and
            shift (the shortcut's BatchNorm always has).
    """

    expansion = 4

    def __init__(self, in_chs: int, planes: int, norm_affine: bool = True) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, affine=norm_affine)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, affine=norm_affine)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs, affine=norm_affine)
        self.downsample = None
        if in_chs != out_chs:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The residual bottleneck on ``x``."""
        shortcut = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + shortcut)


class Stem(nn.Module):
    """Two 3x3 convs with BatchNorm and ReLU (each strided for ImageNet models), then a 1x1
    projection (conv, BatchNorm, ReLU) to the first branch's width.

    Args:
        in_chans: Input image channels.
        width: Channels of the two 3x3 convs.
        out_chs: Channels of the injection (the first branch's width).
        stride: Stride of each 3x3 conv.
        project: Whether the projection is there when ``width == out_chs`` too (the original
            layout's ``stage0``); it always is when they differ.
    """

    def __init__(self, in_chans: int, width: int, out_chs: int, stride: int, project: bool = False) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_chans, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.proj = None
        if project or width != out_chs:
            self.proj = nn.Sequential(nn.Conv2d(width, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The injection: the two strided convs and, where present, the 1x1 projection."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return x if self.proj is None else self.proj(x)


class MDEQ(nn.Module):
    """Multiscale deep equilibrium classifier.

    Args:
        num_classes: Classifier outputs (0 for none).
        in_chans: Input image channels.
        global_pool: Pooling type of the classifier head.
        drop_rate: Dropout before the classifier.
        channels: Width of each equilibrium branch (highest resolution first).
        head_channels: Bottleneck widths of the head per branch (outputs are 4x these).
        num_features: Width of the final 1x1 conv before pooling.
        expansion: Width multiplier inside each branch block.
        groups: GroupNorm groups inside the equilibrium layer.
        dropout: Variational (per-forward, per-channel) dropout inside the equilibrium layer.
        stem_width: Channels of the stem convs (default: 64 in the ``'timm'`` layout, the first
            branch's width in the ``'original'`` one).
        stem_stride: Stride of each stem conv (2 for ImageNet, 1 for CIFAR).
        weight_norm: Weight-normalize the convs of the equilibrium layer (in the ``'original'``
            layout only those of the branch blocks and after the fusion, as the original code).
        layout: ``'timm'`` (this project's) or ``'original'``: the classifier of the authors'
            MDEQ-Vision code (``MDEQClsNet``), whose checkpoints :func:`checkpoint_filter_fn`
            converts. The original layout always has the stem's 1x1 projection (``stage0``), no
            weight norm on the fusion convs, ``groups // 2`` GroupNorm groups after the fusion,
            BatchNorms without scale and shift inside the head's bottlenecks, and biases on the
            head's strided and final convs.
        post_norm_affine: Whether the GroupNorm after the fusion has a learned scale and shift
            (the original configs' ``POST_GN_AFFINE``).
        drop_path_rate: Must be 0: stochastic depth would make f a different map at every
            solver step (timm's ``train.py --drop-path`` passes it; a non-zero rate raises).
        drop_block_rate: Must be 0, for the same reason (``--drop-block``).
        bn_momentum: Momentum of every BatchNorm (stem and head), as timm's ``--bn-momentum``.
        bn_eps: Epsilon of every BatchNorm, as timm's ``--bn-eps``.
        deq_cfg: A ``DEQConfig`` or a dict of its fields; other keyword arguments that name
            ``DEQConfig`` fields (``f_max_iter=14``, ``jac_weight=2.5``, ...) override it.
        device: Device of the parameters and buffers.
        dtype: Floating-point dtype of the parameters and buffers.
    """

    def __init__(
            self,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            channels: Sequence[int] = (32, 64, 128, 256),
            head_channels: Sequence[int] = (28, 56, 112, 224),
            num_features: int = 2048,
            expansion: int = 5,
            groups: int = 8,
            dropout: float = 0.,
            stem_width: Optional[int] = None,
            stem_stride: int = 2,
            weight_norm: bool = True,
            layout: str = 'timm',
            post_norm_affine: bool = False,
            drop_path_rate: float = 0.,
            drop_block_rate: float = 0.,
            bn_momentum: Optional[float] = None,
            bn_eps: Optional[float] = None,
            deq_cfg: Union[DEQConfig, Mapping[str, Any], None] = None,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
            **deq_kwargs: Any,
    ) -> None:
        super().__init__()
        for arg, rate, why in (
                ('drop_path_rate', drop_path_rate, 'stochastic depth drops residual branches at random per call'),
                ('drop_block_rate', drop_block_rate, 'DropBlock draws a new spatial mask per call')):
            if rate:
                raise OptionValueError(
                    f'{arg}={rate} is not supported by MDEQ: {why}, and inside the equilibrium layer f must be '
                    'the same map at every solver step. Use dropout= (variational dropout: one mask per forward '
                    'pass, shared by all solver steps) or drop_rate= (before the classifier)', arg)
        if len(channels) != len(head_channels) or not channels:
            raise OptionValueError(f'channels {tuple(channels)} and head_channels {tuple(head_channels)} must be '
                                   'non-empty and of the same length (one per branch)', 'channels', 'head_channels')
        bad = [c for c in list(channels) + [c * expansion for c in channels] if c % groups]
        if bad:
            raise OptionValueError(f'groups={groups} must divide every branch width and its expansion, not {bad}',
                                   'groups', 'channels', 'expansion')
        if layout not in LAYOUTS:
            raise OptionValueError(f'layout={layout!r} is not one of {LAYOUTS}', 'layout')
        original = layout == 'original'
        post_groups = groups // 2 if original else groups
        if original and (post_groups < 1 or any(c % post_groups for c in channels)):
            raise OptionValueError(f"layout='original' normalizes after the fusion with groups // 2 = {post_groups} "
                                   f'groups, which must be >= 1 and divide every branch width {tuple(channels)}',
                                   'groups', 'layout', 'channels')
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.layout = layout
        cell = MultiscaleCell(channels, expansion, groups, dropout, post_groups=post_groups,
                              post_affine=post_norm_affine)
        for m in cell.modules():
            if isinstance(m, nn.Conv2d):
                # The original code's initialization. It does not make f a contraction: each conv
                # but the first branch's second one (whose output meets the injection) is followed
                # by a GroupNorm that undoes its scale, and the residual path carries z at gain 1.
                # At initialization rho(J_f) is 1.27-1.60 for every variant and layout (measured
                # at 32-64 px), and Broyden stops at relative residuals of 0.3-0.5.
                nn.init.normal_(m.weight, std=0.01)
        if weight_norm:
            for m in ([*cell.blocks, *cell.post] if original else [cell]):
                apply_weight_norm(m, types=(nn.Conv2d,))
        if isinstance(deq_cfg, Mapping):
            deq_cfg = DEQConfig.from_dict(deq_cfg)
        if stem_width is None:
            stem_width = channels[0] if original else 64
        self.stem = Stem(in_chans, stem_width, channels[0], stem_stride, project=original)
        self.deq = DEQLayer(cell, deq_cfg, **deq_kwargs)

        head_out = [h * Bottleneck.expansion for h in head_channels]
        self.incre = nn.ModuleList([
            Bottleneck(c, h, norm_affine=not original) for c, h in zip(channels, head_channels)])
        self.downsamp = nn.ModuleList([
            nn.Sequential(nn.Conv2d(head_out[i], head_out[i + 1], 3, stride=2, padding=1, bias=original),
                          nn.BatchNorm2d(head_out[i + 1]), nn.ReLU())
            for i in range(len(head_out) - 1)])
        self.final = nn.Sequential(
            nn.Conv2d(head_out[-1], num_features, 1, bias=original), nn.BatchNorm2d(num_features), nn.ReLU())
        self.num_features = num_features
        self.global_pool, self.fc = create_classifier(num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = num_features * self.global_pool.feat_mult()
        self.head_drop = nn.Dropout(drop_rate)

        stem_reduction = stem_stride ** 2
        # One identity per branch on the equilibrium state, so that forward hooks (timm's
        # feature_cls='hook') and FX graph nodes ('fx') see exactly the states the getter returns.
        self.states = nn.ModuleList([nn.Identity() for _ in channels])
        self.feature_branch: Optional[int] = None  # set by prune_intermediate_layers
        self.feature_info = [
            dict(num_chs=c, reduction=stem_reduction * 2 ** i, module=f'states.{i}')
            for i, c in enumerate(channels)]
        self._init_weights()
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = m.momentum if bn_momentum is None else bn_momentum
                m.eps = m.eps if bn_eps is None else bn_eps
        name_deq_layers(self)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _init_weights(self) -> None:
        # The equilibrium layer keeps the initialization it was built with.
        for name, m in self.named_modules():
            if name == 'deq' or name.startswith('deq.'):
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- equilibrium-layer controls -------------------------------------------------------------
    @property
    def deq_stats(self) -> Optional[DEQStats]:
        """Solver statistics (and JR term) of the last forward pass."""
        return self.deq.stats

    def set_num_updates(self, num_updates: int) -> None:
        """Optimizer step count: drives pretraining, the JR schedule and per-step random draws."""
        self.deq.set_num_updates(num_updates)

    def set_epoch(self, epoch: int) -> None:
        """Epoch number for the equilibrium layer (drives ``jac_stop_epoch``)."""
        self.deq.set_epoch(epoch)

    # -- timm model interface -------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups in depth order for timm's layer decay and freezing.

        Args:
            coarse: two blocks (equilibrium layer, head) instead of the head's stages one by one.

        Returns:
            timm's matcher dict, with the stem, then the equilibrium layer (one weight-tied layer,
            one group), then the head's per-branch stages and final conv in the order they run.
        """
        return dict(
            stem=r'^stem',
            blocks=[(r'^deq\.', (0,)), (r'^(?:incre|downsamp|final)', (1,))] if coarse else [
                (r'^deq\.', (0,)),
                (r'^incre\.(\d+)', (1,)),
                (r'^downsamp\.(\d+)', (2,)),
                (r'^final', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Accepted for timm compatibility; has no effect. The implicit backward pass already keeps
        no per-iteration activations (memory is that of one application of f)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> Union[str, nn.Module]:
        """The classifier module, or its attribute name (``'fc'``) with ``name_only``."""
        return 'fc' if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier (and pooling) on the model's device, dtype and train/eval mode.

        Args:
            num_classes: outputs of the new classifier (0: none, pooled features are returned).
            global_pool: pooling type (default: keep the current one; ``''`` for none).
        """
        ref = next(self.parameters())
        self.num_classes = num_classes
        pool_type = global_pool if global_pool is not None else self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool_type)
        for m in (self.global_pool, self.fc):
            m.to(device=ref.device, dtype=ref.dtype).train(self.training)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()

    def _equilibrium(self, x: torch.Tensor) -> List[torch.Tensor]:
        z = self.deq(self.stem(x))[0]  # indexing, not unpacking: an FX proxy cannot be unpacked
        return [self.states[i](z[i]) for i in range(len(self.states))]

    def _merge(self, z: List[torch.Tensor]) -> torch.Tensor:
        if self.feature_branch is not None:
            return z[self.feature_branch]
        y = self.incre[0](z[0])
        for i in range(1, len(self.incre)):
            y = self.incre[i](z[i]) + self.downsamp[i - 1](y)
        return self.final(y)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The head's feature map, from the equilibrium states (or the last kept state after pruning)."""
        return self._merge(self._equilibrium(x))

    def forward_from_deq_state(self, z: List[torch.Tensor]) -> torch.Tensor:
        """The logits :meth:`forward` computes from the equilibrium layer's output, for another
        state ``z`` of the layer (one tensor per branch): fixed-point correction supervises the
        solver's states through it.

        The head's BatchNorms normalize with the batch's statistics in training, as for the
        output, but do not update their running statistics: those stay the fixed points'.
        """
        norms = [m for part in (self.incre, self.downsamp, self.final) for m in part.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
        saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
        try:
            for m in norms:
                m.momentum = 0.0  # running <- (1 - 0) * running: unchanged
            logits = self.forward_head(self._merge([self.states[i](z[i]) for i in range(len(self.states))]))
        finally:
            for m, (momentum, count) in zip(norms, saved):
                m.momentum = momentum
                m.num_batches_tracked.copy_(count)
        return logits

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooling, dropout and the classifier (only the pooled features with ``pre_logits``)."""
        x = self.global_pool(x)
        x = self.head_drop(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the images ``x``."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The equilibrium state of the selected branches (all four are solved jointly, so
        ``stop_early`` saves nothing but the head), and optionally the final features."""
        if output_fmt != 'NCHW':
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take = _take_indices(len(self.feature_info), indices)
        z = self._equilibrium(x)
        intermediates = [z[i] for i in take]
        if intermediates_only:
            return intermediates
        return self._merge(z), intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Keep what the selected equilibrium states need: all branches are solved jointly, so
        the equilibrium layer stays whole and only the head can go.

        Args:
            indices: the branches whose states are wanted (timm's convention: an int n for the
                last n, or a list of indices).
            prune_norm: unused (the model has no final norm).
            prune_head: remove the HRNet head and the classifier; ``forward_features`` then returns
                the state of the last selected branch and ``num_features`` is its width.

        Returns:
            the selected branch indices.
        """
        take = _take_indices(len(self.feature_info), indices)
        if prune_head:
            self.incre, self.downsamp, self.final = nn.ModuleList(), nn.ModuleList(), nn.Identity()
            self.feature_branch = max(take)
            self.num_features = self.feature_info[self.feature_branch]['num_chs']
            self.reset_classifier(0, '')
        return take


def _take_indices(num: int, indices: Optional[Union[int, Sequence[int]]]) -> List[int]:
    """timm's convention: None for all, an int n for the last n, else explicit (negative ok)."""
    if indices is None:
        return list(range(num))
    if isinstance(indices, int):
        if not 0 < indices <= num:
            raise ValueError(f'indices={indices} must select between 1 and {num} of the {num} branches')
        return list(range(num - indices, num))
    take = [i + num if i < 0 else i for i in indices]
    if any(not 0 <= i < num for i in take):
        raise ValueError(f'indices {list(indices)} out of range for {num} branches')
    return take


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: MDEQ) -> Dict[str, Any]:
    """Prepare a checkpoint's state dict for ``model`` (timm's ``pretrained_filter_fn``).

    A state dict of the authors' MDEQ-Vision code (``MDEQClsNet``: keys ``downsample.*``,
    ``stage0.*``, ``fullstage.*``, ``incre_modules.*``, ...) is converted to this model's keys;
    the model must be in the ``'original'`` layout. A state dict of this project (as
    ``timm_deq.train``, ``save_for_hf`` or ``model.state_dict()`` write it) passes unchanged, with
    the equilibrium layer's step count (``deq.schedule_state``) taken from the model when the
    checkpoint has none.

    Args:
        state_dict: the checkpoint's tensors (timm has already picked ``state_dict_ema`` or
            ``state_dict`` out of a training checkpoint).
        model: the model being loaded.

    Returns:
        the state dict to load into ``model``.
    """
    if is_original_state_dict(state_dict):
        if getattr(model, 'layout', None) != 'original':
            raise ValueError(
                "this checkpoint is in the original MDEQ-Vision layout (keys 'fullstage.*', 'stage0.*', ...) but "
                f"the model is in the {getattr(model, 'layout', None)!r} layout; create it with layout='original' "
                "(or the '.locuslab_in1k' tag of mdeq_small/mdeq_xl for the authors' released weights)")
        return convert_original_state_dict(state_dict, model)
    own = model.state_dict()
    missing = {k: own[k].clone() for k in own if k.endswith('schedule_state') and k not in state_dict}
    return {**state_dict, **missing} if missing else state_dict


def _create_mdeq(variant: str, pretrained: bool = False, **kwargs) -> MDEQ:
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        if not cfg.has_weights and cfg.state_dict is None:
            raise RuntimeError(
                f'No pretrained weights are published for {variant}{"." + cfg.tag if cfg.tag else ""}; name a '
                "source: pretrained_cfg_overlay=dict(file=PATH) (a checkpoint of timm_deq.train or timm, a "
                "state dict, or with the '.locuslab_in1k' tag the authors' original MDEQ-Small/XL weights), "
                "a 'local-dir:PATH' or 'hf-hub:ORG/NAME' model name, or timm's train.py --pretrained-path; else "
                "pretrained=False")
    out_indices = kwargs.pop('out_indices', (0, 1, 2, 3))
    if kwargs.get('features_only') and kwargs.get('feature_cls') in ('dict', 'list'):
        raise OptionValueError(
            f"feature_cls={kwargs['feature_cls']!r} rebuilds the model as its top-level modules run one after another "
            "(timm's FeatureDictNet/FeatureListNet), and an MDEQ is not such a sequence: its equilibrium layer "
            "returns all four branch states at once. Use feature_cls='getter' (the default), 'hook' or 'fx', "
            'which return the same states', 'feature_cls')
    return build_model_with_cfg(
        MDEQ, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=out_indices),
        **kwargs,
    )


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bilinear', 'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv1', 'classifier': 'fc', 'license': 'mit', **kwargs,
    }


def _cifar_cfg(**kwargs) -> Dict[str, Any]:
    return _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0,
                mean=_CIFAR10_MEAN, std=_CIFAR10_STD, **kwargs)


def _released_cfg(config: str, origin: str, *notes: str) -> Dict[str, Any]:
    return _cfg(
        origin_url=origin, paper_ids='arXiv:2006.08656', paper_name='Multiscale Deep Equilibrium Models',
        notes=(f'The authors\' ImageNet checkpoint (trained with their experiments/imagenet/{config}), in the '
               "original layout; not hosted: download it from their README and load it with "
               "pretrained_cfg_overlay=dict(file=PATH)", *notes))


default_cfgs = generate_default_cfgs({
    'mdeq_small': _cfg(),
    # The one released MDEQ-Small file is linked from the 2020 repository and was trained with its
    # config (expansion 4, head 28-224; that code's post-fusion GroupNorms are always affine),
    # which is how other loaders of it build the model and load it strictly. The 2021 repository's
    # cls_mdeq_SMALL.yaml (expansion 5, head 24-192) describes no released file.
    'mdeq_small.locuslab_in1k': _released_cfg('cls_mdeq_SMALL.yaml', 'https://github.com/locuslab/mdeq'),
    'mdeq_large': _cfg(),
    'mdeq_xl': _cfg(),
    'mdeq_xl.locuslab_in1k': _released_cfg('cls_mdeq_XL.yaml',
                                           'https://github.com/locuslab/deq/tree/master/MDEQ-Vision'),
    'mdeq_tiny_cifar': _cifar_cfg(),
    'mdeq_large_cifar': _cifar_cfg(),
})

# The paper's solver settings and training schedules (the recipes in examples/ rely on them).
# ImageNet: Broyden both ways, 14 steps (minus 0-2 at random in training), absolute residual,
# 510000 pretraining steps (of a global batch of 128) with a small JR weight, then the weight
# grows by 0.1 every 50000 steps. CIFAR-10: 8/7 steps, relative residual, 16000 pretraining steps,
# JR off from epoch 90.
_IMAGENET_DEQ = dict(f_solver='broyden', f_max_iter=14, f_max_iter_jitter=2, f_stop_mode='abs', b_solver='broyden',
                     b_max_iter=14, pretrain_steps=510000, pretrain_jac_weight=0.03, jac_weight_increment=0.1,
                     jac_increment_every=50000)
_CIFAR_DEQ = dict(f_solver='broyden', f_max_iter=8, f_max_iter_jitter=2, f_stop_mode='rel', b_solver='broyden',
                  b_max_iter=7, pretrain_steps=16000, jac_stop_epoch=90)
# mdeq_tiny_cifar is ours (CPU demos and tests), not a paper configuration: no schedule.
_TINY_DEQ = dict(f_solver='broyden', f_max_iter=8, f_stop_mode='rel', b_solver='broyden', b_max_iter=7)


# The architecture of the authors' released checkpoints, by pretrained tag: their configs differ
# from the variants' (the JR configs) in the head (MDEQ-Small) and the post-fusion GroupNorm.
_RELEASED_ARGS = {
    'mdeq_small.locuslab_in1k': dict(layout='original', expansion=4, head_channels=(28, 56, 112, 224),
                                     post_norm_affine=True, dropout=0.0),
    'mdeq_xl.locuslab_in1k': dict(layout='original', post_norm_affine=True),
}


def _with_deq(kwargs: Dict[str, Any], **defaults: Any) -> Dict[str, Any]:
    """Variant defaults for DEQ options, overridden by whatever the caller passed."""
    return {**defaults, **kwargs}


def _arch(variant: str, kwargs: Dict[str, Any], original: Optional[Dict[str, Any]] = None,
          **defaults: Any) -> Dict[str, Any]:
    """A variant's architecture arguments: its ``defaults``, then those of the original layout
    (``original``) when it is built in that layout, then those of its pretrained tag (for the
    authors' released weights); the caller's arguments, merged after, override all."""
    tag = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg')).tag
    released = _RELEASED_ARGS.get(f'{variant}.{tag}', {})
    if kwargs.get('layout', released.get('layout')) == 'original':
        defaults.update(original or {})
    return {**defaults, **released}


@register_model
def mdeq_small(pretrained: bool = False, **kwargs) -> MDEQ:
    """MDEQ-small (ImageNet): branches 32-256, JR weight 2.5 at frequency 0.08.

    ``mdeq_small.locuslab_in1k``: the architecture of the authors' released MDEQ-Small ImageNet
    checkpoint, the 2020 code's config (original layout, expansion 4, head 28-224, affine
    post-fusion GroupNorm).
    """
    model_args = _arch('mdeq_small', kwargs, channels=(32, 64, 128, 256), head_channels=(28, 56, 112, 224),
                       dropout=0.02)
    deq_args = _with_deq(kwargs, **_IMAGENET_DEQ, unrolled_layers=5, jac_weight=2.5, jac_freq=0.08)
    return _create_mdeq('mdeq_small', pretrained=pretrained, **dict(model_args, **deq_args))


@register_model
def mdeq_large(pretrained: bool = False, **kwargs) -> MDEQ:
    """MDEQ-large (ImageNet): branches 80-640, JR weight 3.0 at frequency 0.08."""
    model_args = _arch('mdeq_large', kwargs, channels=(80, 160, 320, 640), head_channels=(32, 64, 128, 256),
                       dropout=0.0)
    deq_args = _with_deq(kwargs, **_IMAGENET_DEQ, unrolled_layers=4, jac_weight=3.0, jac_freq=0.08)
    return _create_mdeq('mdeq_large', pretrained=pretrained, **dict(model_args, **deq_args))


@register_model
def mdeq_xl(pretrained: bool = False, **kwargs) -> MDEQ:
    """MDEQ-XL (ImageNet): branches 88-704 with expansion 6 (head as MDEQ-large); in the original
    layout, and as ``mdeq_xl.locuslab_in1k`` (the authors' released ImageNet checkpoint), with an
    affine post-fusion GroupNorm as the authors' XL config.
    """
    model_args = _arch('mdeq_xl', kwargs, dict(post_norm_affine=True), channels=(88, 176, 352, 704),
                       head_channels=(32, 64, 128, 256), expansion=6)
    deq_args = _with_deq(kwargs, **_IMAGENET_DEQ, unrolled_layers=4, jac_weight=3.0, jac_freq=0.08)
    return _create_mdeq('mdeq_xl', pretrained=pretrained, **dict(model_args, **deq_args))


@register_model
def mdeq_tiny_cifar(pretrained: bool = False, **kwargs) -> MDEQ:
    """A small CIFAR-sized MDEQ for CPU demos and tests (not a paper configuration)."""
    model_args = _arch('mdeq_tiny_cifar', kwargs, channels=(8, 16, 32, 64), head_channels=(4, 8, 16, 32),
                       num_features=256, expansion=4, groups=4, stem_width=16, stem_stride=1, dropout=0.1)
    deq_args = _with_deq(kwargs, **_TINY_DEQ, unrolled_layers=4, jac_weight=0.4, jac_freq=0.05)
    return _create_mdeq('mdeq_tiny_cifar', pretrained=pretrained, **dict(model_args, **deq_args))


@register_model
def mdeq_large_cifar(pretrained: bool = False, **kwargs) -> MDEQ:
    """The paper's CIFAR-10 MDEQ (10M): branches 32-256, JR weight 0.4 at frequency 0.02."""
    model_args = _arch('mdeq_large_cifar', kwargs, channels=(32, 64, 128, 256), head_channels=(14, 28, 56, 112),
                       num_features=1680, stem_stride=1, dropout=0.22)
    deq_args = _with_deq(kwargs, **_CIFAR_DEQ, unrolled_layers=8, jac_weight=0.4, jac_freq=0.02)
    return _create_mdeq('mdeq_large_cifar', pretrained=pretrained, **dict(model_args, **deq_args))
