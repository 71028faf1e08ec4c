"""One served model and how it is swapped: :class:`ModelSlot` (no Ray, so it is tested alone).

A slot holds the model a replica serves.  ``swap(ref)`` resolves and loads the new model first and
then replaces the reference in one assignment, so a request that already holds the old model
finishes with it and the next one gets the new one: nothing is dropped or half-loaded.  When the
REF is a registry alias (``models:/genseg-segmenter@champion``), ``poll()`` asks the registry which
version the alias names now and swaps when it moved; a background thread calls it every
``poll_interval_s`` and says so in the replica's log.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

from genseg import tracking
from genseg.loading import load

log = logging.getLogger("ray.serve")


def identity(model) -> dict:
    """Which model a response came from: registry name/version, run id and REF."""
    return {"name": getattr(model, "model_name", None), "version": getattr(model, "version", None),
            "run_id": getattr(model, "run_id", None), "ref": getattr(model, "ref", None)}


def tag(ident: dict) -> str:
    """``genseg-segmenter/3`` for a registry version, else the REF (a checkpoint directory or run id);
    ``ident`` is :func:`identity` or a replica's ``describe()``."""
    if ident.get("name") and ident.get("version") is not None:
        return f"{ident['name']}/{ident['version']}"
    return str(ident.get("ref"))


def header_value(model) -> str:
    """The tag of a loaded model (the response header)."""
    return tag(identity(model))


class ModelSlot:
    def __init__(self, ref: str, tracking_uri: str, expect: str, threads: int = 1, device: str = "cpu"):
        import torch

        torch.set_num_threads(max(1, threads))   # the replica's CPU share, not every core of the node
        self.tracking_uri = tracking_uri
        self.expect = expect
        self.device = device
        self._dirs: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ref = ref
        self.model = self._load(ref)
        self.loaded_at = time.time()

    # ------------------------------------------------------------------ loading and swapping

    def _load(self, ref: str):
        tmp = tempfile.mkdtemp(prefix="genseg-serve-")
        try:
            resolved = tracking.resolve(ref, self.tracking_uri, dst=tmp)
            model = load(resolved, expect=self.expect, device=self.device)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._dirs.append(tmp)
        del self._dirs[:-2]          # keep the current and the previous model's files; older ones go
        return model

    def swap(self, ref: str, why: str) -> bool:
        """Load ``ref`` and serve it from the next request on; -> whether the served model changed."""
        with self._lock:
            new = self._load(ref)
            old = self.model
            changed = header_value(new) != header_value(old) or ref != self.ref
            self.model, self.ref, self.loaded_at = new, ref, time.time()
        if changed:
            log.info("%s: now serving %s (was %s): %s", self.expect, header_value(new), header_value(old), why)
        return changed

    def alias_version(self) -> int | None:
        """The version a ``models:/name@alias`` REF names in the registry now (None for other REFs)."""
        if not self.ref.startswith("models:/") or "@" not in self.ref:
            return None
        from mlflow.tracking import MlflowClient

        name, alias = self.ref[len("models:/"):].split("@", 1)
        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return int(client.get_model_version_by_alias(name, alias).version)

    def poll(self) -> bool:
        """Swap when the alias moved; -> whether it did."""
        version = self.alias_version()
        current = getattr(self.model, "version", None)
        if version is None or version == current:
            return False
        return self.swap(self.ref, f"{self.ref} moved from version {current} to {version}")

    # ------------------------------------------------------------------ the poll thread

    def watch(self, interval_s: float) -> None:
        """(Re)start the background poll every ``interval_s`` seconds (0: stop polling)."""
        self.stop()
        if interval_s <= 0 or not (self.ref.startswith("models:/") and "@" in self.ref):
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s, self._stop), daemon=True,
                                        name=f"genseg-poll-{self.expect}")
        self._thread.start()

    def _run(self, interval_s: float, stop: threading.Event) -> None:
        last_error = None
        while not stop.wait(interval_s):
            try:
                self.poll()
            except Exception as exc:   # keep serving the current model; say why the check failed (once)
                text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if text != last_error:
                    log.warning("%s: could not check %s for a new version (still serving %s): %s",
                                self.expect, self.ref, header_value(self.model), text)
                last_error = text
            else:
                if last_error is not None:
                    log.info("%s: %s can be checked again", self.expect, self.ref)
                last_error = None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def close(self) -> None:
        self.stop()
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        self._dirs.clear()

    def describe(self) -> dict:
        m = self.model
        info = {**identity(m), "kind": m.kind, "following": self.ref, "loaded_at": self.loaded_at,
                "classes": list(getattr(m, "names", None) or (m.classes or {}).get("names") or []),
                "num_classes": m.num_classes, "palette": (m.classes or {}).get("palette")}
        if m.kind != "segmenter":
            info.update(image_size=list(m.image_size), conditional=m.conditional,
                        sampling=m.sampling.to_dict(), sampling_desc=m.sampling.describe(),
                        max_steps=getattr(m.config, "timesteps", None))
        info["path"] = str(Path(getattr(m, "path", "")))
        return info
