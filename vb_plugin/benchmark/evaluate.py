"""Accuracy of the inference forms of a detector: the config's test set
evaluated (mmengine's Runner and the config's evaluator) with the torch
model and with its backbone (+ neck) in each form."""
import copy
from typing import Dict, Optional, Sequence

from mmengine.config import Config
from mmengine.runner import Runner

from ..deploy.calibration import calibration_inputs
from ..deploy.engines import deploy_detector
from ..inference import FORMS, check_forms, optimize_for_inference


def evaluate_forms(cfg: Config,
                   checkpoint: Optional[str] = None,
                   forms: Sequence[str] = ('onnxruntime', ),
                   part: str = 'backbone+neck',
                   calibration_images: int = 100,
                   calibration_split: str = 'train'
                   ) -> Dict[str, Dict[str, float]]:
    """The config's test metrics for the torch model and each form.

    Forms are names of :data:`vb_plugin.inference.FORMS`: engine forms
    ('onnxruntime', 'openvino-int8', ...) put the backbone (+ neck, see
    ``part``) on the engine with :func:`deploy_detector`; torch forms
    ('optimized', 'bf16', ...) replace the backbone by its
    :func:`~vb_plugin.optimize_for_inference` form. int8 forms are
    calibrated on ``calibration_images`` images of the
    ``calibration_split`` set (the training set by default: the test set
    stays unseen).

    Args:
        cfg (Config): A detection config with a test dataloader and
            evaluator, and a ``work_dir``.
        checkpoint (str, optional): The trained model. Defaults to None.
        forms (Sequence[str]): Defaults to ('onnxruntime', ).
        part (str): 'backbone' or 'backbone+neck' for engine forms.
            Defaults to 'backbone+neck'.
        calibration_images (int): Defaults to 100.
        calibration_split (str): Defaults to 'train'.

    Returns:
        dict: ``{'torch': metrics, form: metrics, ...}``.
    """
    check_forms(forms)
    cfg = copy.deepcopy(cfg)
    cfg.load_from = checkpoint
    runner = Runner.from_cfg(cfg)
    results = {'torch': runner.test()}
    reference = copy.deepcopy(runner.model)
    calibration = None
    if any(FORMS[f].get('dtype') == 'int8' for f in forms):
        calibration = list(calibration_inputs(
            cfg, calibration_images, calibration_split,
            data_preprocessor=reference.data_preprocessor))
    for form in forms:
        kwargs = dict(FORMS[form])
        model = copy.deepcopy(reference).eval()
        if kwargs.get('dtype') == 'int8':
            kwargs['calibration'] = calibration
        if kwargs.get('backend', 'auto') != 'auto':
            model = deploy_detector(model, part=part, **kwargs)
        else:
            # NOTE: torch forms and backend='auto' (whichever backend it
            # picks) replace the backbone.
            model.backbone = optimize_for_inference(model.backbone,
                                                    **kwargs)
        runner.model = model
        results[form] = runner.test()
    return results
