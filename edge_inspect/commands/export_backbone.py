"""`edge-inspect export-backbone`: write the pretrained backbone ONNX (needs the `export` extra)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("export-backbone", help="export pretrained EfficientNet-Lite0 to engines/backbone/ (needs PyTorch)")
    p.add_argument("--engines-dir", default="engines")
    p.add_argument("--force", action="store_true", help="re-export even when the file exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..calibration.artifacts import backbone_path
    from ..export.backbone_export import export_backbone

    path = backbone_path(args.engines_dir)
    if path.is_file() and not args.force:
        print(f"{path} exists (use --force to re-export)")
        return 0
    export_backbone(path)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
