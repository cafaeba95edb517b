"""What this machine is: versions, CPU, devices, and which weight formats work (facts for records and `qbench env`)."""
