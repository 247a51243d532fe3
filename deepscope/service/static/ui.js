// Marks every picture of the page loaded (data-loaded="1") or broken ("0"), so that a picture
// that could not be fetched (an expired link) says so, and tests can tell.
"use strict";
(function () {
  const images = Array.from(document.querySelectorAll("img[data-artifact]"));
  let pending = images.length;
  function settle() {
    pending -= 1;
    if (pending === 0) {
      const ok = images.filter((img) => img.dataset.loaded === "1").length;
      document.body.dataset.imagesLoaded = String(ok);
      document.body.dataset.imagesTotal = String(images.length);
    }
  }
  function mark(img) {
    if (img.dataset.loaded) return;
    const ok = img.complete && img.naturalWidth > 0;
    img.dataset.loaded = ok ? "1" : "0";
    if (!ok) {
      const figure = img.closest("figure");
      if (figure) figure.classList.add("broken");
    }
    settle();
  }
  if (images.length === 0) {
    document.body.dataset.imagesLoaded = "0";
    document.body.dataset.imagesTotal = "0";
  }
  for (const img of images) {
    if (img.complete) {
      mark(img);
    } else {
      img.addEventListener("load", () => mark(img));
      img.addEventListener("error", () => mark(img));
    }
  }
})();
