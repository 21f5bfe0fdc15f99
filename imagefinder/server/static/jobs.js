// The "Add to catalogue" panel: start an ingestion job (POST /jobs) with a CSV or images,
// then follow it (GET /jobs/{id}) with a progress bar and the list of failures.
// The API token lives in sessionStorage only: this tab, until it closes; never in a URL.
"use strict";

(() => {
  const $ = (selector) => document.querySelector(selector);
  const ui = {
    form: $("#add-form"),
    token: $("#add-token"),
    files: $("#add-files"),
    start: $("#add-start"),
    job: $("#add-job"),
    progress: $("#add-progress"),
    state: $("#add-state"),
    failures: $("#add-failures"),
  };
  const TOKEN_KEY = "imagefinder-token";
  const JOB_KEY = "imagefinder-job";
  const POLL_MS = 500;
  const FINISHED = ["done", "failed", "cancelled"];

  ui.token.value = sessionStorage.getItem(TOKEN_KEY) || "";
  ui.token.addEventListener("change", () => {
    const token = ui.token.value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  });

  const auth = () => ({ Authorization: "Bearer " + (sessionStorage.getItem(TOKEN_KEY) || "") });

  // Decided by the error's stable code, never by its wording.
  function explain(status, body) {
    const code = body && body.error ? body.error.code : "";
    const message = body && body.error ? body.error.message : "";
    switch (code) {
      case "unauthorized":
        return "The API token is missing or wrong. Enter the server's token above.";
      case "writes_disabled":
        return "This server does not take additions: it has no API token configured.";
      case "too_large":
      case "too_many_files":
      case "too_many_rows":
        return `That is more than the server takes in one go: ${message}`;
      case "too_many_jobs":
        return "The server is already busy with other additions. Try again once they finish.";
      case "invalid_catalog":
        return `That CSV cannot be read: ${message}`;
      default:
        return message ? `Adding failed: ${message}` : `Adding failed (the server answered ${status}).`;
    }
  }

  function show(text) {
    ui.job.hidden = false;
    ui.state.textContent = text;
  }

  function paint(job) {
    const finished = job.done + job.skipped + job.failed;
    ui.progress.max = Math.max(1, job.total);
    ui.progress.value = Math.min(finished, job.total);
    const counts = `${job.done} added, ${job.skipped} already there, ${job.failed} failed`;
    const words = {
      queued: `Waiting to start (${job.total} to add)`,
      running: `Adding: ${finished} of ${job.total} (${counts})`,
      done: `Done: ${counts}`,
      failed: `Failed: ${counts}`,
      cancelled: `Cancelled: ${counts}`,
    };
    ui.state.textContent = words[job.state] || job.state;
    ui.failures.replaceChildren(...job.errors.map((e) => {
      const li = document.createElement("li");
      li.textContent = e.id ? `${e.id}: ${e.reason}` : e.reason; // text, never HTML
      return li;
    }));
  }

  async function follow(id) {
    sessionStorage.setItem(JOB_KEY, id);
    ui.job.hidden = false;
    for (;;) {
      let response;
      try {
        response = await fetch("/jobs/" + encodeURIComponent(id), { headers: auth() });
      } catch (e) {
        show("Cannot reach the server; still trying…");
        await new Promise((r) => setTimeout(r, 2000));
        continue;
      }
      const body = await response.json().catch(() => null);
      if (!response.ok) {
        sessionStorage.removeItem(JOB_KEY);
        show(explain(response.status, body));
        break;
      }
      paint(body);
      if (FINISHED.includes(body.state)) {
        sessionStorage.removeItem(JOB_KEY);
        // The catalogue's new size; /health answers from a cache for half a second.
        if (typeof loadStatus === "function") {
          loadStatus();
          setTimeout(loadStatus, 1000);
        }
        break;
      }
      await new Promise((r) => setTimeout(r, POLL_MS));
    }
    ui.start.disabled = false;
  }

  ui.form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = ui.token.value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    const chosen = [...ui.files.files];
    if (!chosen.length) {
      show("Choose a CSV file or some images first.");
      return;
    }
    const form = new FormData();
    const isCsv = (f) => /\.csv$/i.test(f.name) || f.type === "text/csv";
    if (chosen.length === 1 && isCsv(chosen[0])) form.append("csv", chosen[0]);
    else if (chosen.some(isCsv)) {
      show("Choose either one CSV file, or images: not both.");
      return;
    } else chosen.forEach((f) => form.append("files", f));
    ui.start.disabled = true;
    ui.failures.replaceChildren();
    ui.progress.value = 0;
    show("Uploading…");
    try {
      const response = await fetch("/jobs", { method: "POST", body: form, headers: auth() });
      const body = await response.json().catch(() => null);
      if (response.status !== 202) {
        show(explain(response.status, body));
        ui.start.disabled = false;
        return;
      }
      paint(body);
      follow(body.id);
    } catch (e) {
      show("Cannot reach the server.");
      ui.start.disabled = false;
    }
  });

  // A reload while a job runs picks it up again.
  const running = sessionStorage.getItem(JOB_KEY);
  if (running && sessionStorage.getItem(TOKEN_KEY)) {
    $("#add").open = true;
    ui.start.disabled = true;
    follow(running);
  }
})();
