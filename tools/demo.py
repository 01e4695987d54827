"""The `make demo` smoke run: build Mask R-CNN with a VB backbone from a
config, run one training step and one prediction on a synthetic image.

    python tools/demo.py [--config CONFIG]
"""
import argparse
import time

import torch
from mmengine.logging import MMLogger

from vb_plugin.apis import (build_detector, load_config,
                            synthetic_detection_batch, train_step_and_predict)

DEFAULT_CONFIG = 'configs/mask_rcnn/mask-rcnn_vb-r50_fpn_1x_coco.py'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=DEFAULT_CONFIG)
    parser.add_argument('--size', type=int, nargs=2, default=(320, 416),
                        metavar=('H', 'W'))
    args = parser.parse_args()
    torch.manual_seed(0)
    # mmengine logs every parameter's initialisation at INFO; keep it quiet.
    MMLogger.get_instance('vb_demo', log_level='WARNING')

    cfg = load_config(args.config)
    # No pretrained weights on this machine: random init, same architecture.
    model = build_detector(cfg, pretrained=False)
    backbone = model.backbone
    print(f'config:   {args.config}')
    print(f'backbone: {type(backbone).__name__}(depth={backbone.depth}), '
          f'out_indices={backbone.out_indices}, '
          f'frozen_stages={backbone.frozen_stages}, '
          f'norm_eval={backbone.norm_eval}')
    print(f'          out_channels={backbone.out_channels}, '
          f'out_strides={backbone.out_strides}')

    start = time.perf_counter()
    batch = synthetic_detection_batch(num_images=1, size=tuple(args.size))
    losses, preds = train_step_and_predict(model, batch)
    elapsed = time.perf_counter() - start
    print('one training step: ' + ', '.join(
        f'{k}={v.item():.4f}' for k, v in losses.items()))
    pred = preds[0].pred_instances
    print(f'one prediction: {len(pred)} instances, boxes {tuple(pred.bboxes.shape)}, '
          f'masks {tuple(pred.masks.shape)}')
    print(f'done in {elapsed:.1f} s')


if __name__ == '__main__':
    main()
