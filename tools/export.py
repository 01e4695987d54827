"""Export a config's backbone (or backbone + neck) to ONNX, checked with
onnxruntime against the torch model at two input sizes.

    python tools/export.py CONFIG [CHECKPOINT] --out FILE
        [--part backbone|backbone+neck] [--opset N] [--cfg-options k=v ...]

A thin wrapper over :func:`vb_plugin.deploy.export_config`; see
docs/deploy.md.
"""
import argparse

from mmengine.config import DictAction


def parse_args(argv=None):
    from vb_plugin.deploy import PARTS
    parser = argparse.ArgumentParser(
        description='Export a backbone (+ neck) to ONNX with dynamic batch, '
        'height and width; checked with onnxruntime')
    parser.add_argument('config', help='config file path')
    parser.add_argument('checkpoint', nargs='?',
                        help='checkpoint of the whole model (optional)')
    parser.add_argument('--out', required=True, help='the .onnx file')
    parser.add_argument('--part', default='backbone', choices=PARTS)
    parser.add_argument('--opset', type=int, default=None,
                        help='ONNX opset (default 18)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config settings, key=value')
    return parser.parse_args(argv)


def main(argv=None):
    from vb_plugin.apis import load_config
    from vb_plugin.deploy import export_config
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    exp = export_config(cfg, args.out, args.checkpoint, part=args.part,
                        opset=args.opset)
    print(f'wrote {exp.path} (opset {exp.opset}, {exp.folded} BN folded)')
    print(f'outputs: {", ".join(exp.output_names)}')
    for shape, diff, tol in exp.checks:
        print(f'onnxruntime check at {shape}: max abs diff {diff:.2e} '
              f'(tolerance {tol:.1e})')


if __name__ == '__main__':
    main()
