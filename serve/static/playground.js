// The generation page: a model, a prompt, up to 4 LoRAs with a strength each, size, steps and
// seed; POST /<endpoint>, then the image or animated video and what its headers say.
"use strict";

const MAX_LORAS = 4;
const FACT_HEADERS = ["X-Seed", "X-Model", "X-Inference-Ms", "X-GPU-Seconds", "X-Cost-USD"];
let models = [];
let loras = [];

function currentModel() {
  return models.find((m) => m.name === $("model").value);
}

function fillDefaults() {
  const model = currentModel();
  if (!model) return;
  $("width").value = model.width;
  $("height").value = model.height;
  $("steps").value = model.steps;
  $("image-field").hidden = !model.takes_image;
  loadLoras();
}

async function loadModels() {
  try {
    models = (await apiJson("/playground/models")).models;
  } catch (error) {
    setStatus(`Models: ${error.message}`, "error");
    return;
  }
  $("model").replaceChildren(
    ...models.map((m) => new Option(`${m.name} (/${m.endpoint}, ${m.output})`, m.name)),
  );
  fillDefaults();
  setStatus("Ready.", "idle");
}

async function loadLoras() {
  const model = currentModel();
  $("loras-note").textContent = "";
  try {
    const listed = await apiJson(`/loras?family=${encodeURIComponent(model.family)}`);
    loras = listed.loras.filter((entry) => entry.error === null).map((entry) => entry.name);
  } catch (error) {
    loras = [];
    $("loras-note").textContent = `LoRAs: ${error.message}`;
  }
  for (const select of document.querySelectorAll(".lora-name")) fillLoraOptions(select);
}

function fillLoraOptions(select) {
  const chosen = select.value;
  select.replaceChildren(...loras.map((name) => new Option(name, name)));
  if (loras.includes(chosen)) select.value = chosen;
}

function addLora() {
  const list = $("loras");
  if (list.children.length >= MAX_LORAS) return;
  const row = $("lora-row").content.firstElementChild.cloneNode(true);
  const slider = row.querySelector(".lora-strength");
  const shown = row.querySelector(".lora-value");
  slider.addEventListener("input", () => (shown.textContent = Number(slider.value).toFixed(2)));
  row.querySelector(".lora-remove").addEventListener("click", () => {
    row.remove();
    $("add-lora").disabled = false;
  });
  fillLoraOptions(row.querySelector(".lora-name"));
  list.append(row);
  $("add-lora").disabled = list.children.length >= MAX_LORAS;
}

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function requestBody(model) {
  const body = { prompt: $("prompt").value };
  for (const field of ["width", "height", "steps", "seed"]) {
    if ($(field).value !== "") body[field] = Number($(field).value);
  }
  body.loras = [...document.querySelectorAll(".lora")].map((row) => ({
    name: row.querySelector(".lora-name").value,
    strength: Number(row.querySelector(".lora-strength").value),
  }));
  if (model.takes_image && $("image").files.length) {
    body.image = await readAsDataUrl($("image").files[0]);
  }
  return body;
}

function showFacts(headers, names) {
  const rows = FACT_HEADERS.map((name) => [name, headers.get(name) ?? ""]);
  const cache = (headers.get("X-LoRA-Cache") || "").split(",").filter(Boolean);
  names.forEach((name, i) => rows.push([`LoRA ${name}`, cache[i] === "hit" ? "hot (hit)" : cache[i] || ""]));
  $("facts").replaceChildren(
    ...rows.map(([name, value]) => {
      const row = document.createElement("tr");
      row.append(Object.assign(document.createElement("th"), { textContent: name }));
      row.append(Object.assign(document.createElement("td"), { textContent: value }));
      row.dataset.header = name;
      return row;
    }),
  );
}

async function generate() {
  const model = currentModel();
  if (!model) return setStatus("Load the models first.", "error");
  setStatus(`Generating with ${model.name}...`, "running");
  $("generate").disabled = true;
  try {
    const body = await requestBody(model);
    const started = performance.now();
    const response = await api(`/${model.endpoint}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const blob = await response.blob();
    const img = $("result");
    if (img.dataset.objectUrl) URL.revokeObjectURL(img.dataset.objectUrl);
    img.dataset.objectUrl = URL.createObjectURL(blob);
    await new Promise((resolve, reject) => {
      img.onload = resolve;
      img.onerror = () => reject(new Error("the browser could not decode the result"));
      img.src = img.dataset.objectUrl;
    });
    showFacts(response.headers, body.loras.map((lora) => lora.name));
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    setStatus(`Done in ${seconds} s: seed ${response.headers.get("X-Seed")}.`, "done");
  } catch (error) {
    setStatus(error.message, "error");
  } finally {
    $("generate").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupKeyField();
  $("reload").addEventListener("click", loadModels);
  $("model").addEventListener("change", fillDefaults);
  $("add-lora").addEventListener("click", addLora);
  $("generate").addEventListener("click", generate);
  loadModels();
});
