// ImageFinder's search page: upload or pick a catalogue image, or describe one in words
// (indexes whose model embeds text), and show its nearest neighbours.
// Plain JS, no build step, no network beyond this server.
"use strict";

const $ = (selector) => document.querySelector(selector);
const el = {
  status: $("#status"),
  drop: $("#drop"),
  file: $("#file"),
  k: $("#k"),
  indexField: $("#index-field"),
  index: $("#index"),
  textForm: $("#text-form"),
  text: $("#text"),
  error: $("#error"),
  query: $("#query"),
  queryImg: $("#query-img"),
  queryHeading: $("#query-heading"),
  queryNote: $("#query-note"),
  section: $("#results-section"),
  summary: $("#results-summary"),
  results: $("#results"),
};

const K_MIN = 1;
const K_MAX = 100;
// Written into the page by the server: the upload cap (0: unknown), and the command that
// builds the index, for when there is none yet.
const pageSetting = (name) => document.querySelector(`meta[name="imagefinder-${name}"]`)?.content || "";
const MAX_UPLOAD = Number(pageSetting("max-upload-bytes")) || 0;
const BUILD_COMMAND = pageSetting("build-command");
let current = null; // {kind: "file", file, url} | {kind: "id", id} | {kind: "text", text}
let lastUpload = null; // what Back returns to once the walk's history runs out
let latest = 0; // only the newest search may paint: clicks can outrun answers
let catalogueSize = null;
let searchedK = null; // typing "5" then leaving the field should search once, not twice
let indexes = []; // from /health: [{name, model, vectors, text, ...}], the default first

// The chosen index's name, or "" for the default (the server's first).
const chosenIndex = () => (el.index.value && indexes.length > 1 && el.index.value !== indexes[0].name ? el.index.value : "");
const indexQuery = () => (chosenIndex() ? "index=" + encodeURIComponent(chosenIndex()) : "");
const withIndex = (url) => (indexQuery() ? url + (url.includes("?") ? "&" : "?") + indexQuery() : url);

// The whole id as one path segment: "/" travels as %2F, which the server decodes.
const imageUrl = (id) => "/images/" + encodeURIComponent(id);

function readK() {
  const k = Math.round(Number(el.k.value));
  const clamped = Number.isFinite(k) && el.k.value !== "" ? Math.min(K_MAX, Math.max(K_MIN, k)) : 3;
  if (String(clamped) !== el.k.value) el.k.value = String(clamped);
  return clamped;
}

// -- errors, in words a person understands ---------------------------------------------

function humanSize(bytes) {
  const [size, unit] = bytes >= 1024 * 1024 ? [bytes / (1024 * 1024), "MB"] : [bytes / 1024, "KB"];
  return `${size >= 10 ? Math.round(size) : size.toFixed(1)} ${unit}`;
}

function tooLarge(limit) {
  return { text: "That file is too large to upload." + (limit ? ` The limit is ${humanSize(limit)}.` : "") };
}

// Decided by the error's stable code, never by its wording.
function explain(status, body) {
  const code = body && body.error ? body.error.code : "";
  const message = body && body.error ? body.error.message : "";
  switch (code) {
    case "not_an_image":
    case "empty_upload":
      return { text: "That file is not an image ImageFinder can read. Try a JPEG, PNG, GIF, WebP, BMP or TIFF picture." };
    case "too_large":
      return tooLarge(MAX_UPLOAD);
    case "too_many_pixels":
      return { text: `That image has too many pixels to search (${message}). Try a smaller version of it.` };
    case "index_empty":
    case "index_missing": {
      const state = code === "index_empty" ? "The catalogue index is empty" : "There is no catalogue index yet";
      return {
        text: `${state}, so there is nothing to compare with. Build it with this command, then try again:`,
        command: BUILD_COMMAND,
      };
    }
    case "unknown_id":
    case "file_missing":
      return { text: "That image is no longer in the catalogue. Pick another one, or upload an image." };
    case "invalid_request":
      return { text: current && current.kind === "text" && message
        ? `That text cannot be searched: ${message}`
        : `The number of results must be between ${K_MIN} and ${K_MAX}.` };
    case "text_not_supported":
      return { text: "This index only understands pictures, not words. Pick an index whose model reads text, or search with an image." };
    case "unknown_index":
      return { text: "That index is not on this server any more. Reload the page to see the ones it has." };
    default:
      return { text: message ? `Search failed: ${message}` : `Search failed (the server answered ${status}).` };
  }
}

function showError(problem) {
  el.error.replaceChildren();
  const p = document.createElement("p");
  p.textContent = problem.text;
  el.error.append(p);
  if (problem.command) {
    const code = document.createElement("code");
    code.textContent = problem.command;
    el.error.append(code);
  }
  el.error.hidden = false;
  el.query.hidden = true;
  el.section.hidden = true;
}

function clearError() {
  el.error.hidden = true;
  el.error.replaceChildren();
}

// -- searching -----------------------------------------------------------------------

function showQuery(query) {
  el.queryImg.hidden = query.kind === "text";
  el.queryHeading.classList.toggle("query-quote", query.kind === "text");
  if (query.kind === "text") {
    el.queryImg.removeAttribute("src");
    el.queryHeading.textContent = `“${query.text}”`;
    el.queryNote.textContent = "A description in words";
  } else if (query.kind === "file") {
    el.queryImg.src = query.url;
    el.queryImg.alt = `Your image${query.file.name ? ": " + query.file.name : ""}`;
    el.queryHeading.textContent = "Your image";
    el.queryNote.textContent = query.file.name || "Uploaded image";
  } else {
    el.queryImg.src = withIndex(imageUrl(query.id));
    el.queryImg.alt = `Catalogue image ${query.id}`;
    el.queryHeading.textContent = query.id;
    const link = document.createElement("a");
    link.href = withIndex(imageUrl(query.id));
    link.textContent = "open full size";
    el.queryNote.replaceChildren("From the catalogue · ", link);
  }
  el.query.hidden = false;
}

async function search(query, { focus = false } = {}) {
  const mine = ++latest;
  const k = readK();
  searchedK = k;
  current = query;
  clearError();
  showQuery(query);
  el.results.setAttribute("aria-busy", "true");
  el.summary.textContent = "Searching…";
  let response;
  try {
    if (query.kind === "file" || query.kind === "text") {
      const form = new FormData();
      if (query.kind === "file") form.append("file", query.file, query.file.name || "upload");
      else form.append("q", query.text);
      form.append("k", String(k));
      if (chosenIndex()) form.append("index", chosenIndex());
      const route = query.kind === "file" ? "/similarity-search" : "/text-search";
      response = await fetch(route, { method: "POST", body: form });
    } else {
      response = await fetch(withIndex(`${imageUrl(query.id)}/similar?k=${k}`));
    }
  } catch (e) {
    if (mine !== latest) return;
    el.results.removeAttribute("aria-busy");
    showError({
      text: query.kind === "file"
        ? "The upload did not reach the server. If the file is very large, try a smaller one; otherwise check that ImageFinder is still running."
        : "Cannot reach the ImageFinder server. Check that it is still running.",
    });
    return;
  }
  const body = await response.json().catch(() => null);
  if (mine !== latest) return;
  el.results.removeAttribute("aria-busy");
  if (!response.ok || !body || !Array.isArray(body.results)) {
    showError(explain(response.status, body));
    return;
  }
  render(body.results, k);
  if (focus) el.queryHeading.focus();
}

function render(results, k) {
  const items = results.map((r, i) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "card";
    button.dataset.id = r.id;
    button.setAttribute("aria-label", `Search with ${r.id}, distance ${r.distance.toFixed(3)}`);
    const img = document.createElement("img");
    img.src = withIndex(`${imageUrl(r.id)}/thumbnail`);
    img.alt = `Catalogue image ${r.id}`;
    img.decoding = "async";
    if (i >= 12) img.loading = "lazy";
    const name = document.createElement("span");
    name.className = "card-id";
    name.append(...breakable(r.id));
    const distance = document.createElement("span");
    distance.className = "card-dist";
    distance.textContent = `distance ${r.distance.toFixed(3)}`;
    button.append(img, name, distance);
    const li = document.createElement("li");
    li.append(button);
    return li;
  });
  el.results.replaceChildren(...items);
  const of = catalogueSize ? ` of ${catalogueSize.toLocaleString()}` : "";
  el.summary.textContent = results.length
    ? `The ${results.length} best matches${of} catalogue images, best first (distance 0 means identical). Pick one to search with it.`
    : "No other images in the catalogue.";
  if (results.length < k && results.length) el.summary.textContent += " (That is all of them.)";
  el.section.hidden = false;
}

// Ids break after their slashes on narrow cards ("pagoda/" + "image_0004"), not mid-word.
function breakable(id) {
  return id.split("/").flatMap((part, i, parts) =>
    i < parts.length - 1 ? [part + "/", document.createElement("wbr")] : [part]);
}

function upload(file) {
  if (!file) return;
  if (MAX_UPLOAD && file.size > MAX_UPLOAD) {
    latest += 1; // an answer still on its way for an earlier search must not paint over this
    showError(tooLarge(MAX_UPLOAD));
    return;
  }
  if (lastUpload && lastUpload.url) URL.revokeObjectURL(lastUpload.url);
  lastUpload = { kind: "file", file, url: URL.createObjectURL(file) };
  if (location.hash) history.pushState(null, "", location.pathname);
  search(lastUpload);
}

function walkTo(id) {
  history.pushState({ id }, "", "#" + new URLSearchParams({ id }).toString());
  search({ kind: "id", id }, { focus: true });
}

const idInHash = () => new URLSearchParams(location.hash.slice(1)).get("id");

// -- wiring --------------------------------------------------------------------------

el.file.addEventListener("change", () => {
  upload(el.file.files[0]);
  el.file.value = ""; // so choosing the same file again searches again
});

el.results.addEventListener("click", (event) => {
  const card = event.target.closest(".card");
  if (card) walkTo(card.dataset.id);
});

let kTimer = 0;
function kChanged() {
  clearTimeout(kTimer);
  if (current && readK() !== searchedK) search(current);
}
el.k.addEventListener("change", kChanged);
el.k.addEventListener("input", () => {
  clearTimeout(kTimer);
  if (el.k.value !== "") kTimer = setTimeout(kChanged, 400);
});

// Files can be dropped anywhere on the page; the drop zone lights up meanwhile.
let dragDepth = 0;
window.addEventListener("dragenter", (e) => {
  e.preventDefault();
  dragDepth += 1;
  el.drop.classList.add("over");
});
window.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) el.drop.classList.remove("over");
});
window.addEventListener("dragover", (e) => e.preventDefault());
window.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  el.drop.classList.remove("over");
  upload(e.dataTransfer && e.dataTransfer.files[0]);
});
window.addEventListener("paste", (e) => {
  const file = e.clipboardData && e.clipboardData.files[0];
  if (file) upload(file);
});

window.addEventListener("popstate", () => {
  const id = idInHash();
  if (id) search({ kind: "id", id });
  else if (lastUpload) search(lastUpload);
});

// A catalogue image that is not a browser format (TIFF, BMP on some) still has a thumbnail.
el.queryImg.addEventListener("error", () => {
  if (current && current.kind === "id" && !el.queryImg.src.includes("/thumbnail")) {
    el.queryImg.src = withIndex(`${imageUrl(current.id)}/thumbnail`);
  }
});

// The status line and the text box follow the chosen index.
function showIndex() {
  const chosen = indexes.find((i) => i.name === el.index.value) || indexes[0];
  if (!chosen) return;
  catalogueSize = chosen.vectors || 0;
  el.status.textContent = catalogueSize
    ? `${catalogueSize.toLocaleString()} images indexed with ${chosen.model}`
    : "No images indexed yet";
  el.textForm.hidden = !chosen.text;
}

async function loadStatus() {
  try {
    const health = await (await fetch("/health")).json();
    indexes = Array.isArray(health.indexes) && health.indexes.length
      ? health.indexes
      : [{ name: "", ...health }];
    el.index.replaceChildren(...indexes.map((i) => {
      const option = document.createElement("option");
      option.value = i.name;
      option.textContent = i.model ? `${i.name} (${i.model}${i.text ? ", text" : ""})` : i.name;
      return option;
    }));
    el.indexField.hidden = indexes.length < 2;
    showIndex();
  } catch (e) {
    el.status.textContent = "Cannot reach the server";
  }
}

el.index.addEventListener("change", () => {
  showIndex();
  // An uploaded image or a text searches the new index; a catalogue id may not be in it.
  if (current && current.kind !== "id") search(current);
});

el.textForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = el.text.value.trim();
  if (!text) return;
  if (lastUpload && lastUpload.url) URL.revokeObjectURL(lastUpload.url);
  lastUpload = { kind: "text", text };
  if (location.hash) history.pushState(null, "", location.pathname);
  search(lastUpload);
});

loadStatus();
if (idInHash()) search({ kind: "id", id: idInHash() });
