"""`kolora fetch models --clip --aesthetics [--filters nsfw,watermark] [--scorers pickscore,hps,imagereward] --to DIR`: the scorer models for filter ops
and evaluate, from the Hugging Face hub (their home; HF_ENDPOINT selects a mirror), into DIR/<hub id>/ --
Data-Juicer's external models home layout, which is what scorers.dir names. `--tiny` writes tiny random ones
there instead (offline).

--clip fetches both CLIPs (OpenAI CLIP for English, Chinese-CLIP for Chinese text); --aesthetics the LAION
aesthetic predictor; --filters the image classifiers of Data-Juicer's image_nsfw_filter / image_watermark_filter
(kolora.models.scorers.CLASSIFIERS); --scorers the reward scorers of scorers.rewards (PickScore and the CLIP
repository its processor comes from, processor files only; HPSv2's checkpoint (--hps-version) and ImageReward's,
converted here into transformers folders by kolora.models.reward_ports, their raw downloads then deleted); --captioner [ID] the captioner of data.captions (kolora.models.captioner).
Only one weight format is taken per repository (safetensors when there is one), and what arrived is checked like
`kolora check models` does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kolora.core.files import FileChecker, Report
from kolora.core.offline import offline_variable
from kolora.models import captioner, reward_ports, scorers
from kolora.models.fetch import DEFAULT_PROBE_TIMEOUT, FetchError, login_node_advice, unreachable_reason

# huggingface_hub: imported in the functions that use them (a login node's CLI starts without them)

_META = ["*.json", "*.txt", "*.model"]  # configs, tokenizer/processor files


def wanted(clip: bool, aesthetics: bool, scfg=None, filters: list[str] = ()) -> list[str]:
    s = scfg or scorers
    names = [getattr(s, "clip", scorers.CLIP_EN), getattr(s, "chinese_clip", scorers.CLIP_ZH)] if clip else []
    names += [getattr(s, "aesthetic", scorers.AESTHETIC)] if aesthetics else []
    return names + [scorers.CLASSIFIERS[key].hub_id for key in filters]


def _hub_download(repo_id: str, folder: Path) -> None:
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi().list_repo_files(repo_id)
    weights = [f for f in files if f.endswith(".safetensors")] or [f for f in files if f == "pytorch_model.bin"]
    snapshot_download(repo_id, local_dir=str(folder), allow_patterns=_META + weights)


def _hub_download_processor(repo_id: str, folder: Path) -> None:
    """A repository read for its processor only (PickScore's): configs and tokenizer files, no weights."""
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id, local_dir=str(folder), allow_patterns=_META)


def check_folder(report: Report, folder: Path) -> None:
    c = FileChecker(report)
    c.file(folder / "config.json")
    c.weights(folder, ("model", "pytorch_model"))


def download_all(names: list[str], to: Path, command: str, timeout: float, download=None) -> None:
    """Each hub repository `name` into to/<name>; FetchError with the login-node advice (naming `command`) when
    the hub cannot be reached or a download fails."""
    if offline_variable("huggingface"):
        why = "HF_HUB_OFFLINE is set, as kolora sets it for compute jobs"
    else:
        from huggingface_hub import constants

        why = unreachable_reason(constants.ENDPOINT, timeout)
    if why:
        raise FetchError(f"cannot reach the Hugging Face hub ({why}).\n{login_node_advice(command)}")
    download = download or _hub_download
    for name in names:
        try:
            download(name, to / name)
        except Exception as e:  # noqa: BLE001 - network, HTTP and hub errors of many types
            raise FetchError(f"downloading {name} failed ({e.__class__.__name__}: {str(e)[:300]}).\n"
                             f"{login_node_advice(command)}") from e


def _hub_download_files(repo_id: str, folder: Path, files: tuple[str, ...]) -> None:
    """Named files of a repository (the raw checkpoints the ported reward scorers are converted from)."""
    from huggingface_hub import hf_hub_download

    for name in files:
        hf_hub_download(repo_id, name, local_dir=str(folder))


def _raw_files(key: str, hps_version: str) -> tuple[str, ...]:
    """The files of a ported reward scorer's repository its conversion reads."""
    return (reward_ports.HPS_FILES[hps_version],) if key == "hps" else reward_ports.IMAGEREWARD_FILES


def reward_targets(rewards: list[str], hps_version: str = scorers.HPS_VERSION) -> dict[str, str]:
    """Each reward scorer's model folder under DIR (PickScore's hub id; the converted folder of the others)."""
    return {key: scorers.hps_folder(version=hps_version) if key == "hps" else scorers.REWARDS[key][0]
            for key in rewards}


def fetch(to: Path, clip: bool, aesthetics: bool, tiny: bool = False, timeout: float = DEFAULT_PROBE_TIMEOUT,
          download=None, filters: list[str] = (), rewards: list[str] = (), hps_version: str = scorers.HPS_VERSION
          ) -> Report:
    names = wanted(clip, aesthetics, filters=filters)
    processors = list(dict.fromkeys(scorers.REWARDS[key][1] for key in rewards))  # read for their processor files
    ported = [key for key in rewards if key != "pickscore"]  # converted from raw checkpoints
    targets = reward_targets(rewards, hps_version)
    to = Path(to).resolve()
    command = "kolora fetch models" + (" --clip" if clip else "") + (" --aesthetics" if aesthetics else "") + \
        (f" --filters {','.join(filters)}" if filters else "") + \
        (f" --scorers {','.join(rewards)}" if rewards else "") + \
        (f" --hps-version {hps_version}" if "hps" in rewards and hps_version != scorers.HPS_VERSION else "") + \
        f" --to {to}"
    classifiers = {scorers.CLASSIFIERS[key].hub_id: key for key in filters}
    if tiny:
        for key in rewards:
            scorers.build_tiny_reward(to, key, (targets[key], *((scorers.REWARDS[key][1],) if key == "pickscore"
                                                                 else ())))
        for name in names:
            if name in classifiers:
                scorers.build_tiny_classifier(to / name, classifiers[name])
            elif name == scorers.CLIP_EN:
                scorers.build_tiny_clip(to / name)
            elif name == scorers.CLIP_ZH:
                scorers.build_tiny_chinese_clip(to / name)
            else:
                scorers.build_tiny_aesthetic(to / name, name=name)
    else:
        raw = to / ".raw"  # the ported scorers' hub files, deleted once converted
        raw_of = {scorers.REWARDS[key][0]: _raw_files(key, hps_version) for key in ported}

        def fetch_one(name: str, folder: Path) -> None:
            folder = raw / name if name in raw_of else folder
            if download is not None:
                download(name, folder)
            elif name in raw_of:
                _hub_download_files(name, folder, raw_of[name])
            else:
                (_hub_download_processor if name in processors else _hub_download)(name, folder)

        pickscore = [scorers.PICKSCORE] if "pickscore" in rewards else []
        download_all(names + pickscore + processors + list(raw_of), to, command, timeout, fetch_one)
        for key in ported:
            _convert(key, raw / scorers.REWARDS[key][0], to / scorers.REWARDS[key][1], to / targets[key],
                     hps_version)
        shutil.rmtree(raw, ignore_errors=True)
    report = Report(to, "scorer models" + (" (tiny, random)" if tiny else ""))
    for name in names + list(targets.values()):
        check_folder(report, to / name)
    for name in [scorers.REWARDS["pickscore"][1]] if "pickscore" in rewards else []:  # read when scoring
        FileChecker(report).file(to / name / "config.json")
    extra = {"hps_version": hps_version} if "hps" in rewards and hps_version != scorers.HPS_VERSION else {}
    report.config["scorers"] = {"dir": str(to), **({"rewards": list(rewards)} if rewards else {}), **extra}
    return report


def _convert(key: str, raw: Path, processor: Path, out: Path, hps_version: str) -> None:
    """A ported reward scorer's downloaded files -> its transformers folder `out`, written whole or not at all."""
    def save(tmp: Path) -> None:
        if key == "hps":
            reward_ports.convert_hps(raw / reward_ports.HPS_FILES[hps_version], processor, tmp)
        else:
            reward_ports.convert_imagereward(raw, processor, tmp)

    try:
        scorers.write_converted(out, save)
    except reward_ports.PortError as e:  # a checkpoint that is not the architecture kolora ports it onto
        raise FetchError(f"converting {key}'s checkpoint into {out} failed: {e}") from e


def fetch_captioner(to: Path, names: list[str] | None = None, tiny: bool = False,
                    timeout: float = DEFAULT_PROBE_TIMEOUT, download=None) -> Report:
    """`kolora fetch models --captioner [ID]`: the captioner(s) of data.captions into DIR/<hub id>/ (both default
    ones, English and Chinese, without an id); --tiny builds tiny random ones instead."""
    names = names or [captioner.CAPTIONER_EN, captioner.CAPTIONER_ZH]
    to = Path(to).resolve()
    command = f"kolora fetch models --captioner {' '.join(names) if len(names) == 1 else ''}".rstrip() + f" --to {to}"
    if tiny:
        for name in names:
            captioner.build_tiny_captioner(to / name)
    else:
        download_all(names, to, command, timeout, download)
    report = Report(to, "captioner" + (" (tiny, random)" if tiny else ""))
    for name in names:
        check_folder(report, to / name)
    report.config["scorers"] = {"dir": str(to)}
    return report
