"""Small configurations of every registered VB backbone for the contract
suite. A family registered without an entry here fails
``test_every_registered_backbone_has_cases``."""

BACKBONE_CASES = {
    'VBResNet': [
        dict(depth=18, base_channels=8),
        dict(depth=50, base_channels=8),
        dict(depth=50, base_channels=8, deep_stem=True, avg_down=True,
             style='caffe'),
        dict(depth=18, base_channels=8,
             norm_cfg=dict(type='GN', num_groups=4, requires_grad=True)),
    ],
}


def case_id(case):
    return ','.join(f'{k}={v["type"] if k == "norm_cfg" else v}'
                    for k, v in case.items()) or 'default'


def iter_cases():
    for name, cases in BACKBONE_CASES.items():
        for case in cases:
            yield name, case


def build(name, **kwargs):
    from mmengine.registry import MODELS
    return MODELS.build(dict(type=name, **kwargs))
