"""What a predict output folder holds, recorded in its manifest's `predictions` section so that outputs never mix
models: the model that made the maps (dataset, kind, checkpoint hashes, plans, step size), the inputs of the last run
and the map of each input done so far.

A run first drops every map entry it cannot vouch for (all of them without `continue_`; with it, those of another
model or of a changed input), so at any moment the listed maps are of one model and of the current inputs.
`nnScreener_evaluate` scores exactly these.
"""
import json
import sys
from os.path import abspath, isfile, join
from typing import Dict, Iterable, List, Optional, Tuple

from nnscreener.utilities.io import input_size_and_mtime
from nnscreener.utilities.output_folder import claim_outputs, load_manifest, save_manifest

PREDICTIONS = 'predictions'


class PredictionRun:
    """The manifest of one predict run into `folder`; `maps_to_keep` are the cases whose existing map is the current
    model's map of the current input."""

    def __init__(self, folder: str, manifest: dict, cases: Dict[str, str], outputs: Dict[str, str],
                 model_identity: dict, continue_: bool):
        self.folder, self.manifest, self.outputs = folder, manifest, outputs
        inputs = {case: input_fingerprint(f) for case, f in cases.items()}
        earlier = manifest.get(PREDICTIONS, {})
        same_model = continue_ and _plain(earlier.get('model')) == _plain(model_identity)
        self.maps_to_keep = {case for case, name in earlier.get('maps', {}).items() if same_model and case in inputs
                             and name == outputs[case] and earlier['inputs'].get(case) == inputs[case]}
        _warn_about_earlier_maps(folder, earlier, outputs, continue_, same_model)
        manifest[PREDICTIONS] = {'model': _plain(model_identity), 'inputs': inputs,
                                 'maps': {case: outputs[case] for case in sorted(self.maps_to_keep)}}
        self.claim(list(outputs.values()))

    def claim(self, names: Iterable[str]) -> None:
        """Lists files this run is about to write (see `claim_outputs`)."""
        self.manifest = claim_outputs(self.folder, names, self.manifest)

    def record_map(self, case: str, name: str) -> None:
        """Lists a map once it is written: only then does it count as the current model's."""
        self.manifest[PREDICTIONS]['maps'][case] = name
        save_manifest(self.folder, self.manifest)


def input_fingerprint(fname: str) -> dict:
    """Path, size and modification time (of a series folder: of its files): an input replaced by another file makes
    its map stale."""
    size, mtime_ns = input_size_and_mtime(fname)
    return {'path': abspath(fname), 'bytes': size, 'mtime_ns': mtime_ns}


def listed_maps(folder: str) -> Optional[Tuple[Dict[str, str], List[str]]]:
    """({case: map file name}, cases of the last run without a map yet) of a predict output folder; None for a folder
    without predictions in its manifest (maps from elsewhere)."""
    predictions = load_manifest(folder).get(PREDICTIONS)
    if predictions is None:
        return None
    maps = predictions['maps']
    return maps, sorted(c for c in predictions['inputs'] if c not in maps)


def _warn_about_earlier_maps(folder: str, earlier: dict, outputs: Dict[str, str], continue_: bool,
                             same_model: bool) -> None:
    maps = earlier.get('maps', {})
    stale = sorted(name for case, name in maps.items() if case not in outputs and isfile(join(folder, name)))
    if stale:
        print(f'nnScreener_predict: {len(stale)} map(s) in {folder} from an earlier run are not inputs of this one '
              f'({", ".join(stale[:5])}{" ..." if len(stale) > 5 else ""}): no longer listed in the manifest, so '
              f'nnScreener_evaluate ignores them', file=sys.stderr)
    if continue_ and maps and not same_model:
        print(f'nnScreener_predict: the maps in {folder} were made by another model or setting '
              f'({_describe(earlier["model"])}): recomputing them with this one', file=sys.stderr)


def _describe(identity: dict) -> str:
    return ', '.join(f'{k} {v}' for k, v in identity.items() if k in ('dataset', 'model', 'density_trainer',
                                                                    'step_size') and v is not None)


def _plain(value):
    """As the manifest's JSON holds it (tuples as lists), so identities compare equal after a round trip."""
    return json.loads(json.dumps(value))
