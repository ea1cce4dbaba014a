// The training page: PUT /datasets/{name} (multipart), POST /train, then GET /train/{id} every
// POLL_MS with its loss plot and samples until the job ends.
"use strict";

const POLL_MS = 1000;
const ENDED = ["SUCCEEDED", "FAILED", "STOPPED"];
const SHOWN = ["state", "step", "total_steps", "loss", "lr", "eta_s", "output_lora", "message"];
let jobId = null;
let shownSamples = new Set();
let lossStep = null;

async function loadModels() {
  try {
    const { models } = await apiJson("/playground/models");
    $("base-model").replaceChildren(...models.map((m) => new Option(m.name, m.family)));
  } catch (error) {
    setStatus(`Models: ${error.message}`, "error");
  }
}

function stem(filename) {
  return filename.replace(/\.[^.]*$/, "");
}

async function uploadDataset() {
  const files = [...$("dataset-files").files];
  const captioned = new Set(files.filter((f) => f.name.endsWith(".txt")).map((f) => stem(f.name)));
  const form = new FormData();
  for (const file of files) {
    form.append("files", file, file.name);
    if (!file.name.endsWith(".txt") && !captioned.has(stem(file.name))) {
      const caption = new Blob([$("caption").value], { type: "text/plain" });
      form.append("files", caption, `${stem(file.name)}.txt`);
    }
  }
  const name = $("dataset-name").value.trim();
  try {
    const body = await apiJson(`/datasets/${encodeURIComponent(name)}`, { method: "PUT", body: form });
    setStatus(`Dataset ${name} stored: ${body.images?.length ?? files.length} images.`, "uploaded");
  } catch (error) {
    setStatus(`Dataset: ${error.message}`, "error");
  }
}

function jobBody() {
  const config = {
    max_train_steps: Number($("max-steps").value),
    rank: Number($("rank").value),
    resolution: Number($("resolution").value),
  };
  const prompt = $("sample-prompt").value.trim();
  if (prompt) {
    config.sample_prompts = [prompt];
    config.sample_every = config.max_train_steps;
  }
  return {
    base_model: $("base-model").value,
    dataset: $("dataset-name").value.trim(),
    trigger_word: $("trigger-word").value.trim(),
    character_id: $("character-id").value.trim(),
    config: { ...config, ...JSON.parse($("extra-config").value || "{}") },
  };
}

async function startJob() {
  let body;
  try {
    body = jobBody();
  } catch (error) {
    return setStatus(`More config: not JSON (${error.message})`, "error");
  }
  try {
    const started = await apiJson("/train", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    jobId = started.job_id;
    shownSamples = new Set();
    lossStep = null;
    $("samples").replaceChildren();
    $("stop").disabled = false;
    setStatus(`Job ${jobId} submitted.`, "running");
    poll();
  } catch (error) {
    setStatus(`Train: ${error.message}`, "error");
  }
}

function showProgress(status) {
  $("progress").replaceChildren(
    ...SHOWN.filter((k) => status[k] !== undefined && status[k] !== null).map((k) => {
      const row = document.createElement("tr");
      row.dataset.field = k;
      row.append(Object.assign(document.createElement("th"), { textContent: k }));
      row.append(Object.assign(document.createElement("td"), { textContent: String(status[k]) }));
      return row;
    }),
  );
}

async function showPlots(status) {
  if (status.step && status.step !== lossStep) {
    try {
      await showBlob($("loss"), `/train/${jobId}/loss.png`);
      lossStep = status.step;
    } catch (_) {
      // not written yet: the next poll tries again
    }
  }
  for (const url of status.samples || []) {
    if (shownSamples.has(url)) continue;
    const img = document.createElement("img");
    img.alt = url;
    await showBlob(img, url);
    $("samples").append(img);
    shownSamples.add(url);
  }
}

async function poll() {
  const current = jobId;
  let status;
  try {
    status = await apiJson(`/train/${current}`);
  } catch (error) {
    setStatus(`Status: ${error.message}`, "error");
    return;
  }
  if (current !== jobId) return;
  showProgress(status);
  await showPlots(status);
  if (ENDED.includes(status.state)) {
    if (status.state === "SUCCEEDED") await showPlots({ ...status, step: -1 });
    $("stop").disabled = true;
    const done = status.state === "SUCCEEDED" ? "done" : "error";
    setStatus(`Job ${current}: ${status.state}.`, done);
    return;
  }
  setStatus(`Job ${current}: ${status.state}, step ${status.step ?? 0}/${status.total_steps ?? "?"}.`, "running");
  setTimeout(poll, POLL_MS);
}

async function stopJob() {
  if (!jobId) return;
  try {
    await api(`/train/${jobId}`, { method: "DELETE" });
  } catch (error) {
    setStatus(`Stop: ${error.message}`, "error");
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupKeyField();
  $("upload").addEventListener("click", uploadDataset);
  $("start").addEventListener("click", startJob);
  $("stop").addEventListener("click", stopJob);
  loadModels();
});
