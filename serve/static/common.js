// What both playground pages share: the API key (kept in sessionStorage, sent as a Bearer
// token), calls to the API, and showing loraplex's error body.
"use strict";

const KEY_STORAGE = "loraplex.api_key";
// The app's root as seen from this page (`data-root` on <html>): the app may be served under a
// route prefix, so API paths are resolved against it rather than against the host.
const APP_ROOT = new URL(`${document.documentElement.dataset.root}/`, location.href);

function appUrl(path) {
  return new URL(path.replace(/^\//, ""), APP_ROOT).href;
}

function $(id) {
  return document.getElementById(id);
}

function setupKeyField() {
  const field = $("api-key");
  field.value = sessionStorage.getItem(KEY_STORAGE) || "";
  field.addEventListener("input", () => sessionStorage.setItem(KEY_STORAGE, field.value.trim()));
}

function authHeaders(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// fetch with the key; a non-2xx answer throws an Error carrying loraplex's code and message.
async function api(path, options = {}) {
  const response = await fetch(appUrl(path), { ...options, headers: authHeaders(options.headers) });
  if (!response.ok) {
    let code = `http_${response.status}`;
    let message = response.statusText;
    try {
      const body = await response.json();
      code = body.error.code;
      message = body.error.message;
    } catch (_) {
      // not loraplex's JSON error body: keep the status line
    }
    const error = new Error(`${response.status} ${code}: ${message}`);
    error.code = code;
    throw error;
  }
  return response;
}

async function apiJson(path, options = {}) {
  return (await api(path, options)).json();
}

// An image the API serves behind the key: <img> cannot send headers, so fetch it as a blob.
async function showBlob(img, path) {
  const blob = await (await api(path)).blob();
  if (img.dataset.objectUrl) URL.revokeObjectURL(img.dataset.objectUrl);
  img.dataset.objectUrl = URL.createObjectURL(blob);
  img.src = img.dataset.objectUrl;
}

function setStatus(text, state) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = state;
}
