"""Test-set accuracy of a trained detector in each inference form (torch,
ONNX Runtime, OpenVINO, bf16, int8), side by side.

    python tools/deploy_eval.py CONFIG CHECKPOINT --forms onnxruntime \
        openvino openvino-bf16 onnxruntime-int8 openvino-int8
        [--part backbone|backbone+neck] [--calibration-images 100]
        [--work-dir DIR] [--cfg-options k=v ...]

A thin wrapper over :func:`vb_plugin.benchmark.evaluate.evaluate_forms`; see
docs/deploy.md.
"""
import argparse
import os

from mmengine.config import DictAction


def parse_args(argv=None):
    from vb_plugin.deploy import PARTS
    from vb_plugin.inference import FORMS
    parser = argparse.ArgumentParser(
        description='Evaluate a detector with its backbone (+ neck) in each '
        'inference form')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--forms', nargs='+', default=['onnxruntime'],
                        choices=list(FORMS))
    parser.add_argument('--part', default='backbone+neck', choices=PARTS)
    parser.add_argument('--calibration-images', type=int, default=100)
    parser.add_argument('--work-dir', default=None)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(argv)


def main(argv=None):
    from vb_plugin.apis import load_config
    from vb_plugin.benchmark.evaluate import evaluate_forms
    args = parse_args(argv)
    cfg = load_config(args.config, args.cfg_options)
    cfg.work_dir = args.work_dir or cfg.get('work_dir') or os.path.join(
        'work_dirs', 'deploy_eval')
    results = evaluate_forms(cfg, args.checkpoint, args.forms, args.part,
                             args.calibration_images)
    keys = [k for k in next(iter(results.values()))
            if k.endswith('_mAP') or k.endswith('_mAP_50') or k == 'mIoU']
    print('| form | ' + ' | '.join(keys) + ' |')
    print('|---' * (len(keys) + 1) + '|')
    for form, metrics in results.items():
        print(f'| {form} | ' + ' | '.join(f'{metrics[k]:.3f}'
                                          for k in keys) + ' |')
    return results


if __name__ == '__main__':
    main()
