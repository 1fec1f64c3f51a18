"""`nnScreener_predict`: unsupervised anomaly maps of raw CTs with the modular or the distilled Screener (or the
autoencoder and local-contrast baselines of the quality benchmark)."""
import os

import torch

from nnscreener.inference.anomaly_maps import OVERLAY_FOLDER, map_identity, map_smoothing_mm, predict_anomaly_maps
from nnscreener.inference.findings import (FindingsSettings, add_findings_arguments, findings_settings,
                                           resolve_reference, write_findings_report)
from nnscreener.inference.trained_model import MODEL_KINDS, load_trained_model
from nnscreener.utilities.cli import add_device_argument, argument_parser
from nnscreener.utilities.errors import ScreenerInputError, exit_on_input_error
from nnscreener.utilities.output_folder import check_output_folder
from nnscreener.utilities.paths import dataset_name, require_env


def predict(input_path, output_folder: str, dataset, model: str = 'modular', device: str = 'cuda',
            step_size: float = 0.5, batch_size: int = 4, overlays: int = 0, continue_: bool = False,
            density_trainer: str = None, reference_folder: str = None, allow_non_hu: bool = False,
            findings: FindingsSettings = None, smoothing_mm: float = None):
    """reference_folder: `<case>.nii.gz` masks whose contours the overlays show (cases without one: no contour).
    allow_non_hu: accept CTs whose values do not look like HU (`check_hounsfield_units`).
    findings: also write the findings report (`nnscreener.inference.findings`); its threshold and normals are
    checked against this model before any map is computed.
    smoothing_mm: Gaussian sigma (mm) of the exported maps inside the body; None = the model's plans
    (`screener.map_smoothing_mm`)."""
    if reference_folder is not None and not os.path.isdir(reference_folder):
        raise ScreenerInputError(f'reference mask folder {reference_folder} does not exist')
    require_env('nnUNet_results')
    check_output_folder(output_folder, (), only_ours=True, subfolders=(OVERLAY_FOLDER,))  # before loading anything
    name = dataset_name(dataset)
    trained = load_trained_model(name, model, torch.device(device), density_trainer)
    model_name = model if model != 'modular' or density_trainer is None else f'{model} ({density_trainer})'
    smoothing_mm = map_smoothing_mm(trained.plans_manager, smoothing_mm)
    reference = resolve_reference(findings, map_identity(trained.identity, step_size, smoothing_mm)) \
        if findings else None
    records = predict_anomaly_maps(input_path, output_folder, trained.patch_model, trained.plans_manager,
                                   trained.configuration_manager, trained.dataset_json, step_size, batch_size,
                                   overlays, continue_, model_name=model_name, reference_folder=reference_folder,
                                   model_identity=trained.identity, allow_non_hu=allow_non_hu,
                                   smoothing_mm=smoothing_mm)
    if reference:
        write_findings_report(output_folder, reference, findings.min_volume_ml, findings.n_png)
    return records


@exit_on_input_error
def predict_entry():
    parser = argument_parser('Voxel-wise anomaly maps (NIfTI, input geometry) and scan scores '
                             'of raw CT scans with a pretrained Screener.')
    parser.add_argument('-i', required=True, nargs='+',
                        help='CT files (.nii.gz, .nii, .mha, .nrrd) and DICOM series folders (one series each), or '
                             'one folder of them')
    parser.add_argument('-o', required=True, help='output folder')
    parser.add_argument('-d', required=True, help='dataset id or name the Screener was pretrained on')
    parser.add_argument('--model', default='modular', choices=MODEL_KINDS,
                        help='modular: descriptor, condition and density models; distilled: the one UNet they were '
                             'distilled into (faster); other kinds: baselines')
    add_device_argument(parser)
    parser.add_argument('--step_size', type=float, default=0.5, help='sliding-window step, fraction of the patch')
    parser.add_argument('--batch_size', type=int, default=4, help='patches per forward pass')
    parser.add_argument('--overlays', type=int, default=0, help='PNG overlays for the N highest-scoring scans')
    parser.add_argument('--smoothing_mm', type=float, default=None,
                        help='Gaussian sigma (mm) of the exported map inside the body; default: the plans\' '
                             'screener.map_smoothing_mm (preset cpu: 4; 0: the map as the model gives it)')
    parser.add_argument('--ref', default=None,
                        help='folder of <case>.nii.gz reference masks: the overlays show their contours')
    parser.add_argument('--c', action='store_true',
                        help='continue: keep the maps the output folder\'s manifest lists as this model\'s maps of the '
                             'same inputs, recompute the others')
    parser.add_argument('--density_trainer', default=None,
                        help='modular model: a density-stage variant trained with nnScreener_pretrain --density_trainer')
    parser.add_argument('--allow_non_hu', action='store_true',
                        help='accept CTs whose values do not look like HU (none below 0, or a range under 10), '
                             'which are refused by default')
    add_findings_arguments(parser)
    args = parser.parse_args()
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise ScreenerInputError('no CUDA device available: pass -device cpu')
    inputs = args.i[0] if len(args.i) == 1 else args.i
    records = predict(inputs, args.o, args.d, args.model, args.device, args.step_size, args.batch_size,
                      args.overlays, args.c, args.density_trainer, args.ref, args.allow_non_hu,
                      findings_settings(args), args.smoothing_mm)
    print(f'{len(records)} anomaly maps in {args.o} (scores.csv)')
