"""Embed a folder of images into the index: python extract_image_features.py --folder data/images"""

from imagefinder.cli import extract

if __name__ == "__main__":
    extract(prog_name="extract_image_features.py")
