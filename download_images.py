"""Download the catalogue's images: python download_images.py --csv_file data/images.csv"""

from imagefinder.cli import download

if __name__ == "__main__":
    download(prog_name="download_images.py")
