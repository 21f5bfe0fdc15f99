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
  more: $("#more"),
  filters: $("#filters"),
  filterChips: $("#filter-chips"),
};

const K_MIN = 1;
const K_MAX = 100;
const MAX_DEPTH = 1000; // k + offset, the deepest the server ranks
const MAX_FILES = 10; // query images in one search
// Written into the page by the server: the upload cap (0: unknown), and the command that
// builds the index, for when there is none yet.
const pageSetting = (name) => document.querySelector(`meta[name="imagefinder-${name}"]`)?.content || "";
const MAX_UPLOAD = Number(pageSetting("max-upload-bytes")) || 0;
const BUILD_COMMAND = pageSetting("build-command");
let current = null; // {kind: "file", files, url} | {kind: "id", id} | {kind: "text", text}
let lastUpload = null; // what Back returns to once the walk's history runs out
let latest = 0; // only the newest search may paint: clicks can outrun answers
let catalogueSize = null;
let searchedK = null; // typing "5" then leaving the field should search once, not twice
let indexes = []; // from /health: [{name, model, vectors, text, ...}], the default first
let filters = []; // [[column, value], ...]: metadata every result must have
let nextOffset = null; // where the next page of the current search starts, or null
let shown = 0; // results on screen for the current search

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
        : `That search cannot be run: ${message || `the number of results must be between ${K_MIN} and ${K_MAX}`}.` };
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
    const first = query.files[0];
    const several = query.files.length > 1;
    el.queryImg.src = query.url;
    el.queryImg.alt = `Your image${first.name ? ": " + first.name : ""}`;
    el.queryHeading.textContent = several ? `Your ${query.files.length} images` : "Your image";
    el.queryNote.textContent = several
      ? "More like all of these: " + query.files.map((f) => f.name || "image").join(", ")
      : first.name || "Uploaded image";
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

// The options every search sends: k, the page's offset, the index and the filters.
function searchOptions(k, offset) {
  const options = [["k", String(k)]];
  if (offset) options.push(["offset", String(offset)]);
  if (chosenIndex()) options.push(["index", chosenIndex()]);
  for (const [column, value] of filters) options.push(["filter", `${column}=${value}`]);
  return options;
}

// A new search, or with {more: true} the next page of the current one, added below.
async function search(query, { focus = false, more = false } = {}) {
  const mine = ++latest;
  const k = more ? searchedK : readK();
  const offset = more ? nextOffset : 0;
  searchedK = k;
  current = query;
  clearError();
  if (!more) showQuery(query);
  el.results.setAttribute("aria-busy", "true");
  el.more.disabled = true;
  if (!more) el.summary.textContent = "Searching…";
  let response;
  try {
    if (query.kind === "file" || query.kind === "text") {
      const form = new FormData();
      if (query.kind === "file") {
        for (const file of query.files) form.append("file", file, file.name || "upload");
      } else {
        form.append("q", query.text);
      }
      for (const [name, value] of searchOptions(k, offset)) form.append(name, value);
      const route = query.kind === "file" ? "/similarity-search" : "/text-search";
      response = await fetch(route, { method: "POST", body: form });
    } else {
      const params = new URLSearchParams(searchOptions(k, offset));
      response = await fetch(`${imageUrl(query.id)}/similar?${params}`);
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
  el.more.disabled = false;
  if (!response.ok || !body || !Array.isArray(body.results)) {
    showError(explain(response.status, body));
    return;
  }
  nextOffset = body.next_offset ?? null;
  render(body.results, k, more);
  if (focus) el.queryHeading.focus();
}

const MATCH_LABEL = { exact: "Same file", near: "Near duplicate" };

function render(results, k, more = false) {
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
    li.className = "result";
    li.append(button, details(r));
    return li;
  });
  if (more) el.results.append(...items);
  else el.results.replaceChildren(...items);
  shown = (more ? shown : 0) + results.length;
  const of = catalogueSize ? ` of ${catalogueSize.toLocaleString()}` : "";
  const among = filters.length ? " with " + filters.map(([c, v]) => `${c} ${v}`).join(" and ") : "";
  el.summary.textContent = shown
    ? `The ${shown} best matches${of} catalogue images${among}, best first (distance 0 means identical). Pick one to search with it.`
    : filters.length ? `No catalogue images${among}.` : "No other images in the catalogue.";
  if (nextOffset === null && shown && results.length < k) el.summary.textContent += " (That is all of them.)";
  el.more.hidden = nextOffset === null;
  el.section.hidden = false;
}

// Under each card: whether it is a copy of the query, and its metadata, each value a
// button that keeps only images sharing it.
function details(r) {
  const box = document.createElement("div");
  box.className = "card-extra";
  if (r.match) {
    const badge = document.createElement("span");
    badge.className = `badge badge-${r.match}`;
    badge.textContent = MATCH_LABEL[r.match] || r.match;
    box.append(badge);
  }
  for (const [column, value] of Object.entries(r.metadata || {})) {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip";
    chip.dataset.column = column;
    chip.dataset.value = value;
    chip.title = `Only images with ${column} ${value}`;
    chip.textContent = `${column}: ${value}`;
    box.append(chip);
  }
  return box;
}

function showFilters() {
  el.filterChips.replaceChildren(...filters.map(([column, value], i) => {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "chip chip-active";
    chip.dataset.remove = String(i);
    chip.setAttribute("aria-label", `Remove the filter ${column} ${value}`);
    chip.textContent = `${column}: ${value} ×`;
    return chip;
  }));
  el.filters.hidden = filters.length === 0;
}

function setFilters(next) {
  filters = next;
  showFilters();
  if (current) search(current);
}

// Ids break after their slashes on narrow cards ("pagoda/" + "image_0004"), not mid-word.
function breakable(id) {
  return id.split("/").flatMap((part, i, parts) =>
    i < parts.length - 1 ? [part + "/", document.createElement("wbr")] : [part]);
}

function upload(fileList) {
  const files = [...(fileList || [])].slice(0, MAX_FILES);
  if (!files.length) return;
  // The server's cap is on the whole request, whatever the number of files.
  const total = files.reduce((sum, f) => sum + f.size, 0);
  if (MAX_UPLOAD && total > MAX_UPLOAD) {
    latest += 1; // an answer still on its way for an earlier search must not paint over this
    showError(tooLarge(MAX_UPLOAD));
    return;
  }
  if (lastUpload && lastUpload.url) URL.revokeObjectURL(lastUpload.url);
  lastUpload = { kind: "file", files, url: URL.createObjectURL(files[0]) };
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
  upload(el.file.files);
  el.file.value = ""; // so choosing the same file again searches again
});

el.results.addEventListener("click", (event) => {
  const chip = event.target.closest(".chip");
  if (chip) {
    const rest = filters.filter(([column]) => column !== chip.dataset.column);
    setFilters([...rest, [chip.dataset.column, chip.dataset.value]]);
    return;
  }
  const card = event.target.closest(".card");
  if (card) walkTo(card.dataset.id);
});

el.filterChips.addEventListener("click", (event) => {
  const chip = event.target.closest(".chip");
  if (chip) setFilters(filters.filter((_, i) => String(i) !== chip.dataset.remove));
});

el.more.addEventListener("click", () => {
  if (current && nextOffset !== null && nextOffset + searchedK <= MAX_DEPTH) {
    search(current, { more: true });
  }
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
  upload(e.dataTransfer && e.dataTransfer.files);
});
window.addEventListener("paste", (e) => {
  const files = e.clipboardData && e.clipboardData.files;
  if (files && files.length) upload(files);
});

window.addEventListener("popstate", () => {
  if (location.hash.startsWith("#duplicates")) return; // duplicates.js shows that view
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
