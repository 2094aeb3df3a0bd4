#!/bin/sh
# What anaconda leaves on DISK with `autopart --type=thinp` and `liveimg` (the image the live
# guest runs): BIOS boot + /boot (no label, UUID in fstab) + a PV whose VG holds a thin pool
# and a thin root LV with the image unpacked, a bootloader on the disk, and the target mounted
# at /mnt/sysimage with /dev, /proc, /sys and /run bound in, ready for %post in a chroot.
set -eu
DISK=$1 VG=${2:-anaconda}
T=/mnt/sysimage
sgdisk --zap-all -n1:1M:+1M -t1:EF02 -n2:0:+1G -t2:8300 -n3:0:0 -t3:8E00 "$DISK" >/dev/null
udevadm settle
mkfs.ext4 -q "${DISK}2"
pvcreate -q -y "${DISK}3"
vgcreate -q "$VG" "${DISK}3"
lvcreate -q -y --type thin-pool -l 90%FREE -n pool00 "$VG"
lvcreate -q -y -V 10G -T "$VG/pool00" -n root
mkfs.ext4 -q "/dev/$VG/root"
mkdir -p "$T"
mount "/dev/$VG/root" "$T"
mkdir -p "$T/boot"
mount "${DISK}2" "$T/boot"
unsquashfs -q -n -f -d "$T" "$(findmnt -n -o SOURCE /run/imgbase/live/lower)"
cat > "$T/etc/fstab" <<FSTAB
#
# /etc/fstab, created by anaconda
#
/dev/mapper/$VG-root /                       ext4    defaults        1 1
UUID=$(blkid -s UUID -o value "${DISK}2") /boot                   ext4    defaults        1 2
FSTAB
grub-install --target=i386-pc --boot-directory="$T/boot" "$DISK" 2>/dev/null
for d in dev proc sys run; do mount --rbind "/$d" "$T/$d"; done
