"""The HTTP API: a FastAPI ingress over the model deployments (OpenAPI docs at ``/docs``).

    GET  /                 the web page (serve_app/static/index.html)
    GET  /healthz          200 when every model deployment answers, else 503
    GET  /v1/models        served models: names, versions, run ids, sampling settings
    POST /v1/segment       image -> label map PNG | JSON of class shares (+ overlay) | overlay PNG
    POST /v1/synthesize    label map PNG (+ params JSON) -> generated image PNG
    POST /v1/edit          image + params JSON (remove classes | replace the background) -> edited PNG

Every bad request gets a 4xx with a JSON body ``{"error": ..., "field": ..., "request_id": ...}``
and the replica goes on serving; a request that runs past its time limit gets a 504.  Each response
names the model version(s) that produced it (``X-Genseg-Model``, ``X-Genseg-Generator``; a
segmentation also the size of the batch it rode in, ``X-Genseg-Batch``) and carries Serve's request id (``X-Request-Id``), which the replicas' log lines repeat.
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures' types at run time
import asyncio
import base64
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from ray import serve

from genseg import imageio
from genseg.data.classes import class_ids, colorize, default_palette
from genseg.editing import EditOptions
from genseg.errors import InputError
from genseg.viz import overlay
from serve_app.options import AppOptions
from serve_app.slot import tag

log = logging.getLogger("ray.serve")
STATIC = Path(__file__).parent / "static"

app = FastAPI(title="genseg", version="1",
              description="Segmentation, label-map-conditioned synthesis and mask-driven editing with the "
                          "models of the genseg registry.")

# The limits the body-size middleware enforces; set from the app's options when the ingress replica
# starts (one ingress per replica process).
LIMITS = {"max_upload_bytes": AppOptions().max_upload_bytes}

SAMPLING_FIELDS = {"sampler": str, "steps": int, "guidance": float, "truncation": float}
EDIT_FIELDS = {"operation", "classes", "keep", "seed", "dilate", "feather", "resample", *SAMPLING_FIELDS}
SYNTH_FIELDS = {"seed", *SAMPLING_FIELDS}
EDIT_BOUNDS = {"dilate": (0, 64), "feather": (0, 32), "resample": (1, 10)}


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def _request_id(request: Request | None = None) -> str | None:
    try:
        return serve.context._get_serve_request_context().request_id or None
    except Exception:   # outside a replica (or Serve's private context moved): the header, if any
        return request.headers.get("x-request-id") if request is not None else None


def _error(status: int, message: str, field: str | None, request: Request | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field, "request_id": _request_id(request)}, status_code=status)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    log.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
    return _error(exc.status, exc.message, exc.field, request)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query")]
    field = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "missing":
        msg = f"missing required field {field!r}"
    log.info("%s %s -> 422: %s", request.method, request.url.path, msg)
    return _error(422, f"{field}: {msg}" if field and first.get("type") != "missing" else msg, field, request)


@app.exception_handler(Exception)
async def _bug(request: Request, exc: Exception):
    log.exception("%s %s -> 500", request.method, request.url.path)
    return _error(500, f"internal error ({type(exc).__name__}); the server's log has the details", None, request)


class BodyLimit:
    """Refuse a request body over ``LIMITS["max_upload_bytes"]`` with a 413, before it is parsed:
    by its Content-Length when it has one, else by counting the bytes as they arrive."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        limit = LIMITS["max_upload_bytes"]
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_big = f"request body is over the limit of {limit:,} bytes"
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_json(send, 413, {"error": f"{too_big} ({int(length):,} bytes)", "field": None,
                                                "request_id": _request_id()})
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooBig()
            return message

        started = False

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.inner(scope, counted, tracked_send)
        except _TooBig:
            if not started:
                await _send_json(send, 413, {"error": too_big, "field": None, "request_id": _request_id()})


class _TooBig(Exception):
    pass


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


app.add_middleware(BodyLimit)


# ------------------------------------------------------------------ request parsing

async def _read_upload(upload: UploadFile | None, field: str, required: bool = True) -> bytes | None:
    if upload is None or (not upload.filename and not upload.size):
        if required:
            raise ApiError(422, f"missing required file {field!r}", field)
        return None
    data = await upload.read()
    if not data:
        raise ApiError(400, f"{field}: the uploaded file is empty", field)
    return data


def _image(data: bytes, field: str, opts: AppOptions) -> np.ndarray:
    try:
        return imageio.read_image(data, max_pixels=opts.max_pixels, what=field)
    except imageio.ImageError as exc:
        status = 413 if isinstance(exc, imageio.ImageTooLarge) else 400
        raise ApiError(status, str(exc), field) from None


def _params(text: str | None, allowed: set[str], field: str = "params") -> dict:
    """The ``params`` form field: a JSON object with known keys only."""
    if text is None or not text.strip():
        return {}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"{field}: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", field) from None
    if not isinstance(doc, dict):
        raise ApiError(400, f"{field}: must be a JSON object, got {type(doc).__name__}", field)
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise ApiError(422, f"{field}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}",
                       field)
    return doc


def _sampling(doc: dict, gen_info: dict, opts: AppOptions) -> dict:
    """The request's sampling overrides, type- and range-checked against the served model and the
    server's limits (a model's own check runs again in its replica)."""
    out = {}
    for name, typ in SAMPLING_FIELDS.items():
        if name not in doc or doc[name] is None:
            continue
        v = doc[name]
        if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise ApiError(422, f"{name} must be a whole number, got {v!r}", name)
        if typ is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ApiError(422, f"{name} must be a number, got {v!r}", name)
        if typ is str and not isinstance(v, str):
            raise ApiError(422, f"{name} must be a string, got {v!r}", name)
        out[name] = float(v) if typ is float else v
    if "guidance" in out and not (math.isfinite(out["guidance"]) and 0 <= out["guidance"] <= opts.max_guidance):
        raise ApiError(422, f"guidance must be a finite number in 0..{opts.max_guidance:g}, got {doc['guidance']!r}",
                       "guidance")
    if "truncation" in out and not (math.isfinite(out["truncation"]) and out["truncation"] >= 0):
        raise ApiError(422, f"truncation must be a finite number >= 0, got {doc['truncation']!r}", "truncation")
    if "steps" in out:
        cap = min(opts.max_steps, gen_info.get("max_steps") or opts.max_steps)
        if not 1 <= out["steps"] <= cap:
            raise ApiError(422, f"steps must be in 1..{cap} (this server's limit {opts.max_steps}, the model's "
                                f"T {gen_info.get('max_steps')}), got {out['steps']}", "steps")
    diffusion_only = {"sampler", "steps", "guidance"} & set(out)
    if gen_info["kind"] == "gan" and diffusion_only:
        raise ApiError(422, f"{', '.join(sorted(diffusion_only))}: the served generator is a GAN (one forward "
                            f"pass); only truncation applies", sorted(diffusion_only)[0])
    if gen_info["kind"] != "gan" and "truncation" in out:
        raise ApiError(422, "truncation applies to GAN generators; the served one is a diffusion model", "truncation")
    return out


def _seed(doc: dict) -> int:
    v = doc.get("seed", 0)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2 ** 63:
        raise ApiError(422, f"seed must be a whole number in 0..2^63-1, got {v!r}", "seed")
    return v


def _classes(value, names: list[str], field: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise ApiError(422, f"{field} must be a non-empty list of class names or ids, e.g. [\"car\"]", field)
    try:
        return class_ids(value, names)
    except InputError as exc:
        raise ApiError(422, f"{field}: {exc}", field) from None


def _label_map(data: bytes, field: str, info: dict, opts: AppOptions, size: tuple[int, int] | None) -> np.ndarray:
    """Class ids from a PNG of ids or of the class colours; ``size`` (H, W), when given, is the
    aspect the label map must have (within 5 %)."""
    try:
        lm = imageio.read_label_map(data, info["num_classes"], palette=_palette(info), max_pixels=opts.max_pixels,
                                    what=field)
    except imageio.ImageError as exc:
        status = 413 if isinstance(exc, imageio.ImageTooLarge) else 422
        raise ApiError(status, str(exc), field) from None
    if size is not None:
        want, got = size[1] / size[0], lm.shape[1] / lm.shape[0]
        if abs(got / want - 1) > 0.05:
            raise ApiError(422, f"{field}: a {lm.shape[0]}x{lm.shape[1]} label map (width/height {got:.2f}) does not "
                                f"fit the model's {size[0]}x{size[1]} images (width/height {want:.2f}); give one "
                                f"with that shape", field)
    return lm


def _palette(info: dict):
    return info.get("palette") or default_palette(info["num_classes"])




def _png(array: np.ndarray, headers: dict) -> Response:
    return Response(imageio.png_bytes(array), media_type="image/png", headers=headers)


# ------------------------------------------------------------------ the ingress

@serve.deployment(name="Api", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16})
@serve.ingress(app)
class Api:
    def __init__(self, segmenter, generator, editor, options: dict):
        self.opts = AppOptions.from_dict(options)
        LIMITS["max_upload_bytes"] = self.opts.max_upload_bytes
        self.seg, self.gen, self.editor = segmenter, generator, editor
        self._info: dict = {}
        self._info_at = 0.0
        # /v1/segment requests are batched here, before the hop to the Segmenter: each hop is an
        # actor call that costs about as much CPU as the forward pass of a small image.  Several
        # batches are in flight at once, so the hops overlap and autoscaled Segmenters share them.
        self._segment_batch.set_max_batch_size(self.opts.max_batch_size)
        self._segment_batch.set_batch_wait_timeout_s(self.opts.batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, max_concurrent_batches=4)
    async def _segment_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, str, int]]:
        out = await self.seg.segment_many.remote(images)
        return [(labels, tag, len(images)) for labels, tag in out]

    async def _call(self, response, timeout: float, what: str):
        """Await a deployment call with a time limit; a model's own input error becomes a 422."""
        async def wait():
            return await response

        try:
            return await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            response.cancel()
            raise ApiError(504, f"{what} did not finish within {timeout:g} s; try fewer steps or a smaller image, "
                                f"or ask for a longer timeout_s (at most this server's limit)") from None
        except InputError as exc:   # raised in the replica (e.g. a label value the model refuses)
            cause = getattr(exc, "cause", exc)
            raise ApiError(422, str(cause).splitlines()[0] if str(cause) else type(cause).__name__) from None

    async def _models(self, fresh: bool = False) -> dict:
        """The served models' descriptions (cached for a second: every request validates against them)."""
        if fresh or time.monotonic() - self._info_at > 1.0:
            seg, gen = await asyncio.gather(self.seg.describe.remote(), self.gen.describe.remote())
            self._info, self._info_at = {"segmenter": seg, "generator": gen}, time.monotonic()
        return self._info

    def _timeout(self, asked: float | None, limit: float) -> float:
        if asked is None:
            return limit
        if not math.isfinite(asked) or asked <= 0:
            raise ApiError(422, f"timeout_s must be a number > 0, got {asked!r}", "timeout_s")
        return min(asked, limit)

    # ------------------------------------------------------------------ pages and metadata

    @app.get("/", include_in_schema=False)
    def index(self):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", summary="200 when every model deployment answers")
    async def healthz(self):
        try:
            info = await asyncio.wait_for(self._models(fresh=True), 10)
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc).splitlines()[0] if str(exc) else
                                 type(exc).__name__}, status_code=503)
        return {"status": "ok", "segmenter": tag(info["segmenter"]), "generator": tag(info["generator"])}

    @app.get("/v1/models", summary="the served models: names, versions, run ids, sampling settings")
    async def models(self):
        info = await self._models(fresh=True)
        limits = {k: getattr(self.opts, k) for k in ("max_upload_bytes", "max_pixels", "max_steps", "max_guidance",
                                                        "segment_timeout_s", "generate_timeout_s")}
        return {**info, "limits": limits}

    # ------------------------------------------------------------------ the work

    @app.post("/v1/segment", summary="image -> label map PNG, or JSON of class pixel shares (+ overlay)",
              responses={200: {"content": {"image/png": {}, "application/json": {}}}})
    async def segment(self, image: UploadFile = File(..., description="an image file (PNG, JPEG, ...)"),
                      format: str = Query("png", description="png (class ids), json (shares) or overlay (PNG)"),
                      overlay_png: bool = Query(False, alias="overlay", description="json: include an overlay PNG"),
                      timeout_s: float | None = Query(None, description="at most the server's segment_timeout_s")):
        if format not in ("png", "json", "overlay"):
            raise ApiError(422, f"format must be png, json or overlay, got {format!r}", "format")
        timeout = self._timeout(timeout_s, self.opts.segment_timeout_s)
        img = _image(await _read_upload(image, "image"), "image", self.opts)
        labels, tag, batch = await self._call(asyncio.ensure_future(self._segment_batch(img)), timeout,
                                              "segmentation")
        headers = {"X-Genseg-Model": tag, "X-Genseg-Batch": str(batch)}
        if format == "png":
            return _png(labels.astype(np.uint8), headers)
        info = (await self._models())["segmenter"]
        palette = _palette(info)
        if format == "overlay":
            return _png(overlay(img, labels, palette), headers)
        counts = np.bincount(labels.ravel(), minlength=info["num_classes"])
        body = {"model": tag, "size": list(labels.shape),
                "classes": [{"id": i, "name": info["classes"][i] if i < len(info["classes"]) else str(i),
                             "color": list(palette[i]), "share": round(float(c) / labels.size, 6)}
                            for i, c in enumerate(counts[: info["num_classes"]])],
                "label_map_png": base64.b64encode(imageio.png_bytes(labels.astype(np.uint8))).decode(),
                "color_png": base64.b64encode(imageio.png_bytes(colorize(labels, palette))).decode()}
        if overlay_png:
            body["overlay_png"] = base64.b64encode(imageio.png_bytes(overlay(img, labels, palette))).decode()
        return JSONResponse(body, headers=headers)

    @app.post("/v1/synthesize", summary="label map (PNG of class ids or class colours) -> generated image PNG",
              responses={200: {"content": {"image/png": {}}}})
    async def synthesize(self, label_map: UploadFile | None = File(None, description="PNG of class ids, or "
                                                                   "painted in the class colours"),
                         params: str | None = Form(None, description='JSON: {"sampler", "steps", "guidance", '
                                                   '"seed"} (defaults: the model\'s registered settings)'),
                         timeout_s: float | None = Query(None)):
        doc = _params(params, SYNTH_FIELDS)
        timeout = self._timeout(timeout_s, self.opts.generate_timeout_s)
        gen_info = (await self._models())["generator"]
        sampling, seed = _sampling(doc, gen_info, self.opts), _seed(doc)
        data = await _read_upload(label_map, "label_map", required=gen_info["conditional"])
        if data is not None and not gen_info["conditional"]:
            raise ApiError(422, "the served generator is unconditional: send no label_map", "label_map")
        lm = None if data is None else _label_map(data, "label_map", gen_info, self.opts,
                                                   tuple(gen_info["image_size"]))
        out, tag, used = await self._call(self.gen.generate.remote(lm, seed, sampling), timeout, "synthesis")
        return _png(out, {"X-Genseg-Model": tag, "X-Genseg-Sampling": json.dumps(used, sort_keys=True)})

    @app.post("/v1/edit", summary="image + operation -> edited image PNG (pixels outside the edit unchanged)",
              responses={200: {"content": {"image/png": {}}}})
    async def edit(self, image: UploadFile = File(...),
                   params: str = Form(..., description='JSON: {"operation": "remove", "classes": ["car"]} or '
                                      '{"operation": "replace_background", "keep": ["road"]}; optional seed, '
                                      'sampler, steps, guidance, dilate, feather, resample'),
                   label_map: UploadFile | None = File(None, description="replace_background: the new "
                                                       "background's label map (else unconditional)"),
                   timeout_s: float | None = Query(None)):
        doc = _params(params, EDIT_FIELDS)
        timeout = self._timeout(timeout_s, self.opts.generate_timeout_s)
        info = await self._models()
        seg_info, gen_info = info["segmenter"], info["generator"]
        op = doc.get("operation")
        if op not in ("remove", "replace_background"):
            raise ApiError(422, f"operation must be 'remove' or 'replace_background', got {op!r}", "operation")
        if gen_info["conditional"] and gen_info["num_classes"] != seg_info["num_classes"]:
            raise ApiError(409, f"the served generator knows {gen_info['num_classes']} classes and the segmenter "
                                f"{seg_info['num_classes']}: they do not share a label set")
        key = "classes" if op == "remove" else "keep"
        other = "keep" if op == "remove" else "classes"
        if other in doc:
            raise ApiError(422, f"{other!r} does not apply to operation {op!r} (use {key!r})", other)
        classes = _classes(doc.get(key), seg_info["classes"], key)
        bounds = {}
        for name, (lo, hi) in EDIT_BOUNDS.items():
            v = doc.get(name, getattr(EditOptions, name))
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ApiError(422, f"{name} must be a whole number in {lo}..{hi}, got {v!r}", name)
            bounds[name] = v
        sampling, seed = _sampling(doc, gen_info, self.opts), _seed(doc)
        if bounds["resample"] > 1 and (gen_info["kind"] == "gan" or sampling.get("sampler",
                                       gen_info["sampling"].get("sampler")) == "dpmpp"):
            raise ApiError(422, "resample > 1 needs a diffusion model with the ddpm or ddim sampler", "resample")
        img = _image(await _read_upload(image, "image"), "image", self.opts)
        lm_data = await _read_upload(label_map, "label_map", required=False)
        if lm_data is not None and op != "replace_background":
            raise ApiError(422, "label_map applies to operation 'replace_background' only", "label_map")
        lm = None if lm_data is None else _label_map(lm_data, "label_map", gen_info, self.opts, img.shape[:2])
        opts = EditOptions(seed=seed, **bounds)
        res = await self._call(self.editor.edit.remote(img, op, classes, lm, gen_info["conditional"], opts, sampling),
                               timeout, "the edit")
        headers = {"X-Genseg-Model": res["segmenter"], "X-Genseg-Edited-Pixels": str(res["edited_pixels"])}
        if res["generator"]:
            headers["X-Genseg-Generator"] = res["generator"]
            headers["X-Genseg-Sampling"] = json.dumps(res["sampling"], sort_keys=True)
        return _png(res["image"], headers)
