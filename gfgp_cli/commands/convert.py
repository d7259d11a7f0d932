"""`gfgp convert`: a model (torchvision name of any task, timm:NAME, package.module:function) -> a converted gfgp checkpoint."""

from __future__ import annotations

import ast

import click

from .. import choices


def _kwarg(ctx, param, values):
    """``--kwarg key=value`` pairs -> a dict; values are Python literals (3, 0.5, True, None,
    (1, 2)) or else strings."""
    kwargs = {}
    for item in values:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE (e.g. --kwarg min_size=320)")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


@click.command("convert")
@click.argument("model", required=False)
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Checkpoint to write (its folder is created).")
@click.option("--pool", type=click.Choice(choices.POOLS), default=None,
              help=f"Pooling that replaces the downsampling sites [default: {choices.DEFAULT_POOL}; skip with --module].")
@click.option("--placement", type=click.Choice(choices.PLACEMENTS), default=choices.DEFAULT_PLACEMENT, show_default=True,
              help="paper: official layouts; exact: move pools only where the output is unchanged; local: no moves.")
@click.option("--activation", type=click.Choice(choices.ACTIVATIONS), default=choices.DEFAULT_ACTIVATION, show_default=True,
              help="Activation that bounds lam (gfgp and maxent pools).")
@click.option("--weights", default=None,
              help="torchvision weights name (DEFAULT, IMAGENET1K_V2, ...; downloads), 'pretrained' (a timm model's own "
                   "weights, of its tag), or a local state_dict file.")
@click.option("--num-classes", type=click.IntRange(min=1), default=None,
              help="Classes the model predicts (constructor argument; detection: background included).")
@click.option("--weights-backbone", default=None,
              help="Detection/segmentation: backbone weights name (IMAGENET1K_V1, ...; downloads) [default: none, random].")
@click.option("--kwarg", "kwargs", multiple=True, callback=_kwarg, metavar="KEY=VALUE",
              help="Another constructor argument (repeatable): aux_loss=True, min_size=320, drop_rate=0.1 (timm) ...")
@click.option("--task", type=click.Choice(choices.TASKS), default=None,
              help="What a timm:NAME or package.module:function model is (its inputs, outputs, training loss and "
                   "metrics) [default: classification]. A torchvision name knows its own task.")
@click.option("--list", "list_models", is_flag=True, help="List every torchvision model gfgp can name, by task, and exit.")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="Input size of the example used for shapes and MACs [default: 224; inception_v3 299; "
                   "video ResNets 112].")
@click.option("--frames", type=click.IntRange(min=1), default=None,
              help="Frames T of a video model's example clip (N, 3, T, size, size) [default: 16].")
@click.option("--module", "comparison", type=click.Choice(choices.COMPARISON_MODULES), default=None,
              help="Insert this comparison block (GFGP's parameter count) before each max/avg pool, which stays.")
@click.option("--include-patch-embed", is_flag=True, help="Also convert patch-embedding convs (kernel == stride >= 4).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial weights (model and new layers).")
@click.option("--dry-run", is_flag=True, help="Convert and report, write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out file.")
def convert_cmd(model, out, pool, placement, activation, weights, num_classes, weights_backbone, kwargs, task, list_models,
                image_size, frames, comparison, include_patch_embed, seed, dry_run, as_json, force):
    """Convert MODEL to GFGP pooling and write a checkpoint.

    MODEL is a torchvision model name (any task), timm:NAME (a timm model; a pretrained tag such
    as timm:resnet50.a1_in1k names the weights --weights pretrained loads), or
    package.module:function (your own function or nn.Module class, called with --num-classes and
    the --kwarg arguments; the folder gfgp runs in is on the import path). The checkpoint records
    the source, so train, eval, export and bench rebuild the model from it.

    Finds the strided convolutions and pooling layers, splits each strided conv into a stride-1
    conv plus skip pooling, moves those pools where the paper puts them, and replaces them with
    the chosen pooling. Prints the sites, parameters and MACs (at the example size) before and
    after, and the exactness check: the same layout with plain skip pools against the original.
    Models torch.fx cannot trace whole (detection, optical flow) are converted part by part:
    each largest traceable submodule (a backbone, an encoder); the rest stays as it was.

    \b
    Examples:
      gfgp convert resnet50 --out resnet50-gfgp.pt
      gfgp convert vgg16_bn --pool maxent --num-classes 10 --out vgg.pt
      gfgp convert resnet18 --placement exact --dry-run --json
      gfgp convert vgg16_bn --module se --out vgg-se.pt
      gfgp convert fcn_resnet50 --num-classes 11 --kwarg aux_loss=True --out fcn.pt
      gfgp convert fasterrcnn_resnet50_fpn --kwarg min_size=512 --kwarg max_size=512 --out frcnn.pt
      gfgp convert timm:convnext_atto --num-classes 10 --out convnext.pt
      gfgp convert timm:resnet50.a1_in1k --weights pretrained --out r50.pt
      gfgp convert mymodels:small_net --kwarg width=32 --out mine.pt
      gfgp convert mymodels:segmenter --task segmentation --num-classes 11 --out seg.pt
      gfgp convert --list
    """
    from ..checkpoint import convert_to_file
    from ..reports import render_conversion, render_model_list

    if list_models:
        render_model_list(as_json=as_json)
        return
    if model is None:
        raise click.UsageError("give a MODEL (a torchvision model name, timm:NAME or package.module:function; "
                               "gfgp convert --list shows torchvision's)")
    if num_classes is not None:
        if "num_classes" in kwargs:
            raise click.BadParameter("give num_classes once: --num-classes or --kwarg num_classes=...", param_hint="--kwarg")
        kwargs["num_classes"] = num_classes
    pool = pool or ("skip" if comparison else choices.DEFAULT_POOL)
    report = convert_to_file(
        model, out, force=force, dry_run=dry_run, pool=pool, placement=placement, activation=activation,
        weights=weights, weights_backbone=weights_backbone, task=task, image_size=image_size, frames=frames, comparison=comparison,
        seed=seed, include_patch_embed=include_patch_embed, **kwargs,
    )
    render_conversion(report, out=None if dry_run else out, as_json=as_json)


COMMANDS = [convert_cmd]
