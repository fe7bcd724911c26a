set datafile separator ','
set key autotitle columnhead
set logscale x
set xlabel 'link bandwidth (Gbit/s)'
set grid
set terminal pngcairo size 1300,700 noenhanced
set key outside right top
set output 'out/bench-ttft-stop17d/ttft-ctx1024.png'
set ylabel 'TTFT (ms)'
set title 'TTFT vs bandwidth, 1024-token prompt (median)'
plot for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] 'out/bench-ttft-stop17d/ttft.csv' using ($1==1024 && $3==s+0 ? $2 : 1/0):4 with linespoints title 'compute, share '.s, for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] '' using ($1==1024 && $3==s+0 ? $2 : 1/0):5 with linespoints title 'load, share '.s, for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] '' using ($1==1024 && $3==s+0 ? $2 : 1/0):6 with linespoints title 'cake, share '.s, for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] '' using ($1==1024 && $3==s+0 ? $2 : 1/0):7 with lines dashtype 2 title 'T*, share '.s
set output 'out/bench-ttft-stop17d/ttft-ctx2048.png'
set ylabel 'TTFT (ms)'
set title 'TTFT vs bandwidth, 2048-token prompt (median)'
plot for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] 'out/bench-ttft-stop17d/ttft.csv' using ($1==2048 && $3==s+0 ? $2 : 1/0):4 with linespoints title 'compute, share '.s, for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] '' using ($1==2048 && $3==s+0 ? $2 : 1/0):5 with linespoints title 'load, share '.s, for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] '' using ($1==2048 && $3==s+0 ? $2 : 1/0):6 with linespoints title 'cake, share '.s, for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] '' using ($1==2048 && $3==s+0 ? $2 : 1/0):7 with lines dashtype 2 title 'T*, share '.s
set output 'out/bench-ttft-stop17d/efficiency.png'
set ylabel 'efficiency T*/T_cake'
set yrange [0.5:1.2]
set title 'Cake efficiency per cell (goal >= 0.95)'
plot for [c in system("awk -F, 'NR>1{print $1}' out/bench-ttft-stop17d/ttft.csv | sort -un")] for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] 'out/bench-ttft-stop17d/ttft.csv' using ($1==c+0 && $3==s+0 ? $2 : 1/0):8 with linespoints title 'ctx '.c.', share '.s.' (medians)', for [c in system("awk -F, 'NR>1{print $1}' out/bench-ttft-stop17d/ttft.csv | sort -un")] for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] '' using ($1==c+0 && $3==s+0 ? $2 : 1/0):23 with linespoints dashtype 3 title 'ctx '.c.', share '.s.' (best runs)', 0.95 with lines dashtype 2 title 'goal'
unset yrange
set terminal svg size 1300,700 noenhanced
set key outside right top
set output 'out/bench-ttft-stop17d/ttft-ctx1024.svg'
set ylabel 'TTFT (ms)'
set title 'TTFT vs bandwidth, 1024-token prompt (median)'
plot for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] 'out/bench-ttft-stop17d/ttft.csv' using ($1==1024 && $3==s+0 ? $2 : 1/0):4 with linespoints title 'compute, share '.s, for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] '' using ($1==1024 && $3==s+0 ? $2 : 1/0):5 with linespoints title 'load, share '.s, for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] '' using ($1==1024 && $3==s+0 ? $2 : 1/0):6 with linespoints title 'cake, share '.s, for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] '' using ($1==1024 && $3==s+0 ? $2 : 1/0):7 with lines dashtype 2 title 'T*, share '.s
set output 'out/bench-ttft-stop17d/ttft-ctx2048.svg'
set ylabel 'TTFT (ms)'
set title 'TTFT vs bandwidth, 2048-token prompt (median)'
plot for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] 'out/bench-ttft-stop17d/ttft.csv' using ($1==2048 && $3==s+0 ? $2 : 1/0):4 with linespoints title 'compute, share '.s, for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] '' using ($1==2048 && $3==s+0 ? $2 : 1/0):5 with linespoints title 'load, share '.s, for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] '' using ($1==2048 && $3==s+0 ? $2 : 1/0):6 with linespoints title 'cake, share '.s, for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] '' using ($1==2048 && $3==s+0 ? $2 : 1/0):7 with lines dashtype 2 title 'T*, share '.s
set output 'out/bench-ttft-stop17d/efficiency.svg'
set ylabel 'efficiency T*/T_cake'
set yrange [0.5:1.2]
set title 'Cake efficiency per cell (goal >= 0.95)'
plot for [c in system("awk -F, 'NR>1{print $1}' out/bench-ttft-stop17d/ttft.csv | sort -un")] for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] 'out/bench-ttft-stop17d/ttft.csv' using ($1==c+0 && $3==s+0 ? $2 : 1/0):8 with linespoints title 'ctx '.c.', share '.s.' (medians)', for [c in system("awk -F, 'NR>1{print $1}' out/bench-ttft-stop17d/ttft.csv | sort -un")] for [s in system("awk -F, 'NR>1{print $3}' out/bench-ttft-stop17d/ttft.csv | sort -u")] '' using ($1==c+0 && $3==s+0 ? $2 : 1/0):23 with linespoints dashtype 3 title 'ctx '.c.', share '.s.' (best runs)', 0.95 with lines dashtype 2 title 'goal'
unset yrange
