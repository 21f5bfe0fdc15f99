// The duplicates view (#duplicates): groups of copies in the catalogue, one row each, a
// thumbnail and a distance per image. Loaded after app.js, whose helpers it uses.
"use strict";

const dup = {
  searchView: $("#search-view"),
  view: $("#duplicates-view"),
  navSearch: $("#nav-search"),
  navDuplicates: $("#nav-duplicates"),
  level: $("#dup-level"),
  error: $("#dup-error"),
  summary: $("#dup-summary"),
  groups: $("#groups"),
  more: $("#dup-more"),
};
const DUP_PAGE = 50; // groups per request
let dupNext = null; // the offset of the next page of groups, or null
let dupShown = 0;
let dupLatest = 0;

const LEVEL_WORDS = {
  exact: "the same file",
  near: "the same picture, edited or re-saved",
  similar: "pictures that look alike",
};

function dupExplain(status, body) {
  const code = body && body.error ? body.error.code : "";
  const message = body && body.error ? body.error.message : "";
  switch (code) {
    case "not_calibrated":
      return "This index's model has no calibrated distance for that level, so only exact copies (the same file) can be found. Choose Exact.";
    case "index_empty":
    case "index_missing":
      return "There is no catalogue index yet, so there is nothing to compare.";
    default:
      return message ? `Cannot list duplicates: ${message}` : `Cannot list duplicates (the server answered ${status}).`;
  }
}

async function loadDuplicates({ more = false } = {}) {
  const mine = ++dupLatest;
  const params = new URLSearchParams({ level: dup.level.value, limit: String(DUP_PAGE) });
  if (more && dupNext !== null) params.set("offset", String(dupNext));
  if (chosenIndex()) params.set("index", chosenIndex());
  dup.error.hidden = true;
  dup.more.disabled = true;
  if (!more) {
    dup.groups.replaceChildren();
    dup.summary.textContent = "Comparing every image in the catalogue…";
  }
  dup.groups.setAttribute("aria-busy", "true");
  let response;
  let body = null;
  try {
    response = await fetch("/duplicates?" + params);
    body = await response.json().catch(() => null);
  } catch (e) {
    response = null;
  }
  if (mine !== dupLatest) return;
  dup.groups.removeAttribute("aria-busy");
  dup.more.disabled = false;
  if (!response || !response.ok || !body || !Array.isArray(body.groups)) {
    dup.error.textContent = response ? dupExplain(response.status, body) : "Cannot reach the ImageFinder server. Check that it is still running.";
    dup.error.hidden = false;
    dup.summary.textContent = "";
    dup.more.hidden = true;
    return;
  }
  const rows = body.groups.map((group, i) => groupRow(group, (more ? dupShown : 0) + i + 1));
  if (more) dup.groups.append(...rows);
  else dup.groups.replaceChildren(...rows);
  dupShown = (more ? dupShown : 0) + rows.length;
  dupNext = body.next_offset ?? null;
  const images = body.groups.reduce((n, g) => n + g.images.length, 0);
  const cut = body.max_distance === null ? "" : ` (distance at most ${body.max_distance.toFixed(3)})`;
  dup.summary.textContent = body.total_groups
    ? `${body.total_groups.toLocaleString()} groups of ${LEVEL_WORDS[body.level]}${cut} among ${body.images.toLocaleString()} images, largest first.`
    : `No groups of ${LEVEL_WORDS[body.level]}${cut} among ${body.images.toLocaleString()} images.`;
  if (!more && images && dupShown < body.total_groups) dup.summary.textContent += ` Showing ${dupShown}.`;
  dup.more.hidden = dupNext === null;
}

function groupRow(group, n) {
  const li = document.createElement("li");
  li.className = "group";
  const heading = document.createElement("p");
  heading.className = "group-heading";
  heading.textContent = `Group ${n} · ${group.images.length} images`;
  const row = document.createElement("ul");
  row.className = "group-row";
  row.setAttribute("aria-label", `Group ${n}`);
  row.append(...group.images.map((image, i) => {
    const item = document.createElement("li");
    const link = document.createElement("a");
    link.className = "dup-card";
    link.href = "#" + new URLSearchParams({ id: image.id }).toString();
    link.dataset.id = image.id;
    link.title = `Search with ${image.id}`;
    const img = document.createElement("img");
    img.src = withIndex(`${imageUrl(image.id)}/thumbnail`);
    img.alt = `Catalogue image ${image.id}`;
    img.loading = "lazy";
    img.decoding = "async";
    const name = document.createElement("span");
    name.className = "card-id";
    name.append(...breakable(image.id));
    const distance = document.createElement("span");
    distance.className = "card-dist";
    distance.textContent = i === 0 ? "first of the group" : `distance ${image.distance.toFixed(3)}`;
    link.append(img, name, distance);
    item.append(link);
    return item;
  }));
  li.append(heading, row);
  return li;
}

// Which view the address shows: #duplicates, or the search page.
function showView() {
  const duplicates = location.hash.startsWith("#duplicates");
  dup.view.hidden = !duplicates;
  dup.searchView.hidden = duplicates;
  dup.navDuplicates.toggleAttribute("aria-current", duplicates);
  dup.navSearch.toggleAttribute("aria-current", !duplicates);
  if (duplicates) {
    dup.navDuplicates.setAttribute("aria-current", "page");
    loadDuplicates();
  } else {
    dup.navSearch.setAttribute("aria-current", "page");
  }
}

dup.level.addEventListener("change", () => loadDuplicates());
dup.more.addEventListener("click", () => loadDuplicates({ more: true }));
el.index.addEventListener("change", () => {
  if (!dup.view.hidden) loadDuplicates();
});
dup.navSearch.addEventListener("click", (event) => {
  // Back to the search as it was (the last search stays on the page).
  event.preventDefault();
  if (location.hash) history.pushState(null, "", location.pathname);
  showView();
});
window.addEventListener("hashchange", showView);
showView();
